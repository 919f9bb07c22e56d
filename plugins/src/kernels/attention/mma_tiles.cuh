// What the tensor-core attention kernels share (attention_mma.cu, attention_mma_bwd.cu): the
// block shape, the staging of 64-row tiles of a head into shared memory (row-major, and
// transposed for the products that reduce over the tile's rows), and the two warp products on
// them (mma.cuh). A warp owns 16 rows of the block's tile (its "own" rows: queries, or keys in
// the dK/dV kernel) as A fragments in registers; the other operand's tile (keys, or queries)
// is staged.
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace attention_mma {

using namespace retort;
typedef unsigned long long u64;

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
// Rows of a staged tile, and a block's own rows (16 per warp).
constexpr int TILE = 16 * WARPS;
// Values after each staged row (conflict-free fragment loads; rows stay 16-byte aligned).
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Whether a head's rows can be copied 8 values (16 bytes) at a time.
template <typename H> __device__ __forceinline__ bool aligned8(const H* head, u64 st, int d) {
  return d % 8 == 0 && st % 8 == 0 && ((u64)(uintptr_t)head & 15) == 0;
}

// Rows `row0 .. row0 + TILE - 1` of a head (row pitch `st`) into `tile [TILE][D + PAD]`, zero past
// `t` and `d`; 8 values at a time where `vec` ([`aligned8`]).
template <typename H, int D>
__device__ __forceinline__ void stage_rows(H* tile, const H* head, u64 st, int row0, int t, int d, bool vec) {
  constexpr int LD = D + PAD;
  if (vec) {
    for (int e = threadIdx.x; e < TILE * (D / 8); e += THREADS) {
      const int r = e / (D / 8), c = e % (D / 8) * 8, row = row0 + r;
      copy8(tile + r * LD + c, row < t && c < d ? head + (u64)row * st + c : nullptr);
    }
  } else {
    for (int e = threadIdx.x; e < TILE * D; e += THREADS) {
      const int r = e / D, c = e % D, row = row0 + r;
      tile[r * LD + c] = row < t && c < d ? head[(u64)row * st + c] : store<H, float>(0.0f);
    }
  }
}

// Rows `row0 .. row0 + TILE - 1` of a head transposed into `xt [D][TILE + PAD]`
// (`xt[c][j] = x[row0 + j][c]`), two rows per word, zero past `t` and `d`; where `vec`, each
// thread reads 8 values of both rows at a time.
template <typename H, int D>
__device__ __forceinline__ void stage_transposed(H* xt, const H* head, u64 st, int row0, int t, int d, bool vec) {
  constexpr int LD = TILE + PAD;
  if (vec) {
    for (int e = threadIdx.x; e < (TILE / 2) * (D / 8); e += THREADS) {
      const int j = 2 * (e / (D / 8)), c = e % (D / 8) * 8, row = row0 + j;
      __align__(16) H lo[8], hi[8];
      copy8(lo, row < t && c < d ? head + (u64)row * st + c : nullptr);
      copy8(hi, row + 1 < t && c < d ? head + (u64)(row + 1) * st + c : nullptr);
#pragma unroll
      for (int i = 0; i < 8; ++i) put_word(xt + (c + i) * LD + j, half_bits(lo[i]) | (half_bits(hi[i]) << 16));
    }
  } else {
    const H zero = store<H, float>(0.0f);
    for (int e = threadIdx.x; e < (TILE / 2) * D; e += THREADS) {
      const int j = 2 * (e / D), c = e % D, row = row0 + j;
      const H lo = row < t && c < d ? head[(u64)row * st + c] : zero;
      const H hi = row + 1 < t && c < d ? head[(u64)(row + 1) * st + c] : zero;
      put_word(xt + c * LD + j, half_bits(lo) | (half_bits(hi) << 16));
    }
  }
}

// The warp's A fragments of its 16 own rows (`16 warp ..`) of a staged tile `[TILE][D + PAD]`.
template <typename H, int D>
__device__ __forceinline__ void own_fragments(uint32_t (&a)[D / 16][4], const H* tile) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(a[kk], tile, D + PAD, 16 * warp, 16 * kk);
}

// `s[n] = A X[8n .. 8n + 7]^T`, reduced over the head dim: the warp's rows (A fragments `a`)
// against the rows of a staged tile `x [TILE][D + PAD]` (f32).
template <typename H, int D>
__device__ __forceinline__ void product_nt(float (&s)[TILE / 8][4], const uint32_t (&a)[D / 16][4], const H* x) {
#pragma unroll
  for (int n = 0; n < TILE / 8; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[2];
      load_b(b, x, D + PAD, 8 * n, 16 * kk);
      mma_16816<H>(s[n], a[kk], b);
    }
  }
}

// `o += P X`, reduced over the tile's rows: `p` (16 x TILE in the accumulators' layout, which
// is the A fragment's: column tiles 2kk and 2kk + 1 are step kk's 16 values) rounded to `H`,
// against the staged tile transposed, `xt [D][TILE + PAD]`.
template <typename H, int D>
__device__ __forceinline__ void product_nn(float (&o)[D / 8][4], const float (&p)[TILE / 8][4], const H* xt) {
#pragma unroll
  for (int kk = 0; kk < TILE / 16; ++kk) {
    const uint32_t a[4] = {
        pack_pair<H>(p[2 * kk][0], p[2 * kk][1]), pack_pair<H>(p[2 * kk][2], p[2 * kk][3]),
        pack_pair<H>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_pair<H>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      uint32_t b[2];
      load_b(b, xt, TILE + PAD, 8 * n, 16 * kk);
      mma_16816<H>(o[n], a, b);
    }
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
