// What the tensor-core attention kernels share (attention_mma.cu, attention_mma_bwd.cu): the
// block shape, the staging of 64-row tiles of a head into shared memory, and the two warp
// products on them (mma.cuh). A warp owns 16 rows of the block's tile (its "own" rows: queries,
// or keys in the dK/dV kernel) as A fragments in registers; the other side's tile (keys, or
// queries) is staged row-major, `[TILE][D + PAD]`, and read by `ldmatrix` in both orientations:
// as is for the products over the head dim (`q k^T`), transposed for those over the tile's
// rows (`P v`). The padding puts a warp's 8-row `ldmatrix` phases on 32 distinct banks.
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace attention_mma {

using namespace retort;
typedef unsigned long long u64;

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
// A block's own rows (16 per warp), and the rows of a staged tile unless a kernel says `N`.
constexpr int TILE = 16 * WARPS;
// Values after each staged row (rows stay 16-byte aligned).
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Whether a head's rows can be copied 8 values (16 bytes) at a time.
template <typename H> __device__ __forceinline__ bool aligned8(const H* head, u64 st, int d) {
  return d % 8 == 0 && st % 8 == 0 && ((u64)(uintptr_t)head & 15) == 0;
}

// Starts staging rows `row0 .. row0 + N - 1` of a head (row pitch `st`) into
// `tile [N][D + PAD]`, zero past `t` and `d`: where `vec` ([`aligned8`]) by `cp.async`, 16
// bytes a copy, which the caller commits and waits for; else by plain stores.
template <typename H, int D, int N = TILE>
__device__ __forceinline__ void stage(H* tile, const H* head, u64 st, int row0, int t, int d, bool vec) {
  constexpr int LD = D + PAD;
  if (vec) {
    for (int e = threadIdx.x; e < N * (D / 8); e += THREADS) {
      const int r = e / (D / 8), c = e % (D / 8) * 8, row = row0 + r;
      const bool live = row < t && c < d;
      cp_async16(tile + r * LD + c, live ? head + (u64)row * st + c : head, live);
    }
  } else {
    for (int e = threadIdx.x; e < N * D; e += THREADS) {
      const int r = e / D, c = e % D, row = row0 + r;
      tile[r * LD + c] = row < t && c < d ? head[(u64)row * st + c] : store<H, float>(0.0f);
    }
  }
}

// The warp's A fragments of its 16 own rows (`16 warp ..`) of a staged tile.
template <typename H, int D>
__device__ __forceinline__ void own_fragments(uint32_t (&a)[D / 16][4], const H* tile) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) fragment_a(a[kk], tile, D + PAD, 16 * warp, 16 * kk);
}

// `s[n] = A X[8n .. 8n + 7]^T`, reduced over the head dim: the warp's rows (A fragments `a`)
// against the `N` rows of a staged tile `x` (f32).
template <typename H, int D, int N>
__device__ __forceinline__ void product_nt(float (&s)[N / 8][4], const uint32_t (&a)[D / 16][4], const H* x) {
#pragma unroll
  for (int n = 0; n < N / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int np = 0; np < N / 16; ++np) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[4];
      fragments_b(b, x, D + PAD, 16 * np, 16 * kk);
      const uint32_t lo[2] = {b[0], b[1]}, hi[2] = {b[2], b[3]};
      mma_16816<H>(s[2 * np], a[kk], lo);
      mma_16816<H>(s[2 * np + 1], a[kk], hi);
    }
  }
}

// `o += P X`, reduced over the tile's `N` rows: `p` (16 x N in the accumulators' layout, which
// is the A fragment's: column tiles 2kk and 2kk + 1 are step kk's 16 values) rounded to `H`,
// against the staged tile `x` read transposed.
template <typename H, int D, int N>
__device__ __forceinline__ void product_nn(float (&o)[D / 8][4], const float (&p)[N / 8][4], const H* x) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    const uint32_t a[4] = {
        pack_pair<H>(p[2 * kk][0], p[2 * kk][1]), pack_pair<H>(p[2 * kk][2], p[2 * kk][3]),
        pack_pair<H>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_pair<H>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b[4];
      fragments_b_trans(b, x, D + PAD, 16 * kk, 16 * np);
      const uint32_t lo[2] = {b[0], b[1]}, hi[2] = {b[2], b[3]};
      mma_16816<H>(o[2 * np], a, lo);
      mma_16816<H>(o[2 * np + 1], a, hi);
    }
  }
}

// Stages of a software pipeline whose tile set (`TILES` staged tiles of `N` rows of head dim
// `D`, e.g. K and V) is `TILES * N * (D + PAD)` values: two (the next set's copies overlap this
// one's products) where both fit in 48 KB of static shared memory, else one.
template <typename H, int D, int TILES, int N = TILE> struct Stages {
  static constexpr int set_bytes = TILES * N * (D + PAD) * (int)sizeof(H);
  static constexpr int count = 2 * set_bytes + 1024 <= 49152 ? 2 : 1;
};

// Runs `body(i, stage)` for the tile sets `i = 0 .. sets - 1`, staged by `issue(i, stage)` into
// stage `i % S`: set `i + S - 1`'s copies start before set `i`'s products, and a barrier after
// each `body` frees its stage for the next `issue`. Every thread of the block calls this.
template <int S, typename Issue, typename Body>
__device__ __forceinline__ void pipelined(int sets, Issue issue, Body body) {
  int issued = 0;
  auto next = [&]() {
    if (issued == sets) return;
    issue(issued, issued % S);
    cp_async_commit();
    ++issued;
  };
  for (int i = 0; i < S - 1; ++i) next();
  for (int i = 0; i < sets; ++i) {
    next();
    cp_async_wait(issued - i - 1);  // set i has landed; the newer one may be in flight
    __syncthreads();
    body(i, i % S);
    __syncthreads();
  }
}

// Zeroes accumulators.
template <int N> __device__ __forceinline__ void zero(float (&x)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) x[n][0] = x[n][1] = x[n][2] = x[n][3] = 0.0f;
}

// Where accumulator element `i` of column tile `n` sits: its row (of the warp's 16, from `lo`)
// and its column (of the staged tile's, from `col0`).
struct Spot {
  int row, col;
};
__device__ __forceinline__ Spot spot(int lo, int col0, int n, int i) {
  const int lane = threadIdx.x & 31;
  return Spot{lo + (lane >> 2) + 8 * (i >> 1), col0 + 8 * n + 2 * (lane & 3) + (i & 1)};
}

}  // namespace attention_mma
