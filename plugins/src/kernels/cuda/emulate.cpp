// The runtime of the CPU emulation of retort's CUDA kernels (see emulate.h): the launch (a team
// of OS threads per block, blocks in order, one launch at a time), the block and warp
// barriers, the warp slots of the shuffles, dynamic shared memory, and the registry of kernels
// by name that `retort_emu_launch` (the Rust side's entry) looks up.
#include "emulate.h"

#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace retort_emu {

thread_local dim3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

// The most bytes a lane hands in to `warp_exchange`.
constexpr std::size_t EXCHANGE_BYTES = 64;

// What the threads of the running block share.
struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> slots;
  std::vector<unsigned char> exchange;  // EXCHANGE_BYTES per thread
  std::vector<std::max_align_t> shared;

  Block(unsigned threads, std::size_t shared_bytes)
      : slots(threads), exchange(threads * EXCHANGE_BYTES), shared((shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)) {
    reset(threads);
  }

  // Fresh barriers for a new block: every thread counts again.
  void reset(unsigned threads) {
    all = std::make_unique<std::barrier<>>(threads);
    warps.clear();
    for (unsigned w = 0; w * 32 < threads; ++w) {
      const unsigned n = threads - w * 32 < 32 ? threads - w * 32 : 32;
      warps.push_back(std::make_unique<std::barrier<>>(n));
    }
  }
};

Block* running = nullptr;
thread_local unsigned flat = 0;

// The calling thread's `cp.async` copies: started (the open group) and committed groups.
struct AsyncCopy {
  void* to;
  const void* from;
  std::size_t bytes;
};
thread_local std::vector<AsyncCopy> started;
thread_local std::deque<std::vector<AsyncCopy>> committed;

std::map<std::string, Launcher>& registry() {
  static std::map<std::string, Launcher> kernels;
  return kernels;
}

std::mutex& one_launch_at_a_time() {
  static std::mutex m;
  return m;
}

// Block and thread coordinates of linear indices (x fastest, as CUDA numbers them).
dim3 coords(unsigned long long i, dim3 shape) {
  dim3 c;
  c.x = (unsigned)(i % shape.x);
  c.y = (unsigned)(i / shape.x % shape.y);
  c.z = (unsigned)(i / shape.x / shape.y);
  return c;
}

// Fills dynamic shared memory with all-ones bytes (NaN as floats) before each block, as the
// GPU's is uninitialised: a kernel that reads before writing sees NaN, not a helpful zero.
void poison(std::vector<std::max_align_t>& shared) {
  std::memset(static_cast<void*>(shared.data()), 0xff, shared.size() * sizeof(std::max_align_t));
}

}  // namespace

void sync_block() { running->all->arrive_and_wait(); }
void sync_warp() { running->warps[flat / 32]->arrive_and_wait(); }
void warp_slot_write(uint64_t bits) { running->slots[flat] = bits; }
uint64_t warp_slot_read(unsigned lane) {
  const std::size_t i = (flat & ~31u) + (lane & 31u);
  return i < running->slots.size() ? running->slots[i] : 0;
}
void warp_exchange(const void* mine, void* all, std::size_t bytes) {
  if (bytes > EXCHANGE_BYTES) std::abort();
  const unsigned first = flat & ~31u;
  const std::size_t lanes = running->slots.size() - first < 32 ? running->slots.size() - first : 32;
  std::memcpy(&running->exchange[flat * EXCHANGE_BYTES], mine, bytes);
  sync_warp();
  auto* out = static_cast<unsigned char*>(all);
  std::memset(out, 0, 32 * bytes);
  for (std::size_t l = 0; l < lanes; ++l) std::memcpy(out + l * bytes, &running->exchange[(first + l) * EXCHANGE_BYTES], bytes);
  sync_warp();
}
void async_copy(void* to, const void* from, std::size_t bytes) { started.push_back(AsyncCopy{to, from, bytes}); }
void async_commit() {
  committed.push_back(std::move(started));
  started.clear();
}
void async_wait(int pending) {
  while (committed.size() > (std::size_t)(pending < 0 ? 0 : pending)) {
    for (const AsyncCopy& c : committed.front()) {
      if (c.from) std::memcpy(c.to, c.from, c.bytes);
      else std::memset(c.to, 0, c.bytes);
    }
    committed.pop_front();
  }
}
void* dynamic_shared() { return running->shared.data(); }

void run(dim3 grid, dim3 block, std::size_t shared_bytes, void (*body)(void*), void* ctx) {
  std::lock_guard<std::mutex> lock(one_launch_at_a_time());
  const unsigned threads = block.x * block.y * block.z;
  const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
  if (threads == 0 || blocks == 0) return;
  block_dim = block;
  grid_dim = grid;
  Block state(threads, shared_bytes);
  poison(state.shared);
  running = &state;
  unsigned long long current = 0;
  auto next = [&]() noexcept {
    ++current;
    state.reset(threads);
    poison(state.shared);
  };
  std::barrier<decltype(next)> between(threads, next);
  std::vector<std::thread> team;
  team.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    team.emplace_back([&, t] {
      flat = t;
      thread_idx = coords(t, block);
      while (current < blocks) {
        block_idx = coords(current, grid);
        started.clear();
        committed.clear();
        body(ctx);
        // Returned: no longer counted by the block's barriers (as an exited CUDA thread).
        running->warps[t / 32]->arrive_and_drop();
        running->all->arrive_and_drop();
        between.arrive_and_wait();
      }
    });
  }
  for (auto& th : team) th.join();
  running = nullptr;
}

bool register_kernel(const char* name, Launcher launcher) {
  registry()[name] = launcher;
  return true;
}

}  // namespace retort_emu

// Launches the registered kernel `name` on `grid` x `block` (3 dims each) with `shared_bytes`
// of dynamic shared memory, `params[i]` pointing at its i-th argument. 0 on success, 1 when no
// kernel of that name is registered.
extern "C" int retort_emu_launch(const char* name, const unsigned* grid, const unsigned* block,
                                 std::size_t shared_bytes, void** params) {
  const auto& kernels = retort_emu::registry();
  const auto found = kernels.find(name);
  if (found == kernels.end()) return 1;
  found->second(dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, shared_bytes, params);
  return 0;
}
