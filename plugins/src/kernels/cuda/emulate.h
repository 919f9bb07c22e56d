// The subset of CUDA's device language that retort's kernels use, on the CPU: compiles the
// `.cu` files with the host C++ compiler (`RETORT_EMULATE`, feature `cuda-emulate` of
// retort-plugins) so that their arithmetic, indexing, reductions and barriers run in tests on
// machines without a GPU. Not a performance tool and not a general CUDA runtime.
//
// The model: a launch runs its blocks one after another on a team of `blockDim` OS threads (one
// per CUDA thread). `__shared__` variables are function statics (one block at a time, and one
// launch at a time: launches are serialised), `__syncthreads` is a barrier of the block's
// threads, and the warp primitives (`__shfl_*_sync`, `__syncwarp`) exchange values through a
// per-warp slot array between two barriers of the warp's threads. A thread that returns leaves
// both barriers (as an exited CUDA thread no longer counts). Half types convert with
// round-to-nearest-even, as the device's `_rn` intrinsics do; math is the host's libm, so
// results agree with the GPU's to rounding, not bit for bit.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace retort_emu {

// The calling thread's place in the launch.
extern thread_local dim3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;

// The barriers of the running block and the warp slot exchange (emulate.cpp).
void sync_block();
void sync_warp();
void warp_slot_write(uint64_t bits);
// The block's dynamic shared memory (`shared_mem_bytes` of the launch, 16-byte aligned).
void* dynamic_shared();
uint64_t warp_slot_read(unsigned lane);
// Every lane of the calling warp hands in `bytes` (at most 64) from `mine` and gets all 32
// lanes' in `all` (lane-major); a warp-collective call, as `mma.sync` is.
void warp_exchange(const void* mine, void* all, std::size_t bytes);
// `cp.async` on the CPU: a started copy of `bytes` (zeros where `from` is null) joins the
// calling thread's open group; a commit closes it; a wait performs and retires the oldest
// committed groups until at most `pending` remain (the copies land at the wait, the latest a
// GPU may deliver them).
void async_copy(void* to, const void* from, std::size_t bytes);
void async_commit();
void async_wait(int pending);

template <typename T> T shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  warp_slot_write(bits);
  sync_warp();
  const uint64_t got = warp_slot_read(src_lane);
  sync_warp();
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}

inline unsigned lane_id() {
  const unsigned flat = thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
  return flat & 31u;
}

}  // namespace retort_emu

#define threadIdx (::retort_emu::thread_idx)
#define blockIdx (::retort_emu::block_idx)
#define blockDim (::retort_emu::block_dim)
#define gridDim (::retort_emu::grid_dim)

inline void __syncthreads() { retort_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { retort_emu::sync_warp(); }

template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  const unsigned lane = retort_emu::lane_id();
  const unsigned base = lane & ~(unsigned)(width - 1);
  return retort_emu::shfl(v, base + ((unsigned)src & (unsigned)(width - 1)));
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  const unsigned lane = retort_emu::lane_id();
  const unsigned partner = lane ^ (unsigned)mask;
  const bool inside = (partner & ~(unsigned)(width - 1)) == (lane & ~(unsigned)(width - 1));
  return retort_emu::shfl(v, inside ? partner : lane);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = retort_emu::lane_id();
  const unsigned src = lane + delta;
  const bool inside = (src & ~(unsigned)(width - 1)) == (lane & ~(unsigned)(width - 1));
  return retort_emu::shfl(v, inside ? src : lane);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  const unsigned lane = retort_emu::lane_id();
  const bool inside = (lane & (unsigned)(width - 1)) >= delta;
  return retort_emu::shfl(v, inside ? lane - delta : lane);
}

// ---- device math missing from the host's libm ----

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// ---- half precision: storage types and round-to-nearest-even conversions ----

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  float out;
  if (exp == 0) {  // zero and subnormals: man * 2^-24
    out = std::ldexp((float)man, -24);
    uint32_t b;
    std::memcpy(&b, &out, 4);
    b |= sign;
    std::memcpy(&out, &b, 4);
    return out;
  }
  const uint32_t b = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
  std::memcpy(&out, &b, 4);
  return out;
}

inline __half __float2half_rn(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7fffffffu;
  if (abs >= 0x7f800000u) return __half{(uint16_t)(sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  float a;
  std::memcpy(&a, &abs, 4);
  if (a >= 65520.0f) return __half{(uint16_t)(sign | 0x7c00u)};  // rounds to infinity
  if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2^-24, rounded to even
    const float q = std::nearbyint(a * 16777216.0f);
    return __half{(uint16_t)(sign | (uint16_t)q)};
  }
  const uint32_t exp = (abs >> 23) - 112, man = abs & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
  return __half{(uint16_t)(sign | h)};
}

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t b = (uint32_t)h.bits << 16;
  float out;
  std::memcpy(&out, &b, 4);
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((b >> 16) | 0x40u)};  // NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(b >> 16)};
}

namespace retort_emu {

// Runs `body(ctx)` as every thread of a `grid` of `block`-shaped blocks, one block after another,
// with `shared_bytes` of dynamic shared memory per block.
void run(dim3 grid, dim3 block, std::size_t shared_bytes, void (*body)(void*), void* ctx);
// Registers a kernel's launcher under its name (static initialisers of each `.cu`).
using Launcher = void (*)(dim3 grid, dim3 block, std::size_t shared_bytes, void** params);
bool register_kernel(const char* name, Launcher launcher);

template <typename... P, std::size_t... I>
std::tuple<std::decay_t<P>...> unpack(void** params, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<P>...>(*static_cast<std::decay_t<P>*>(params[I])...);
}

// Launches `kernel` with its arguments read from `params[i]` (a pointer to the i-th argument, as
// `cudaLaunchKernel` takes them).
template <typename... P>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, void** params) {
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  } ctx{kernel, unpack<P...>(params, std::index_sequence_for<P...>{})};
  run(
      grid, block, shared_bytes, [](void* c) {
        auto* x = static_cast<Ctx*>(c);
        std::apply(x->kernel, x->args);
      },
      &ctx);
}

}  // namespace retort_emu

// `extern "C"` kernel `NAME` registered for the emulated launch (see common.cuh's
// `RETORT_INSTANCE`).
#define RETORT_EMULATE_REGISTER(NAME)                                                                 \
  static void NAME##_emulated(dim3 grid, dim3 block, std::size_t shared_bytes, void** params) {        \
    ::retort_emu::launch(&NAME, grid, block, shared_bytes, params);                                   \
  }                                                                                                   \
  static const bool NAME##_registered = ::retort_emu::register_kernel(#NAME, &NAME##_emulated);
