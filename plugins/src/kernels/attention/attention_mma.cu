// The fused causal attention's forward on tensor cores, for bf16 and f16 storage and head dims up
// to 128 (the FMA kernels of attention.cu serve every other dtype and size; mod.rs has the
// formulas, the layouts and the FLOP count). FlashAttention-2's forward (Dao, 2023) on
// `mma.sync.m16n8k16` (mma.cuh): f32 accumulators, the probabilities rounded to the storage
// type for `P V`, the online softmax in f32 on the accumulators' registers.
//
// One block of 4 warps per (64 query rows, head, batch); warp `w` owns query rows
// `16 w .. 16 w + 15` of the block (mma_tiles.cuh). The block stages its Q tile once (the warps
// keep their rows as A fragments in registers), then the tiles of 64 keys up to the diagonal,
// K and V row-major in shared memory (`ldmatrix` reads V transposed for `P V`), by `cp.async`
// in a two-stage pipeline where two stages fit (`d <= 64`): the next tile's copies overlap
// this one's products. Per tile each warp computes `S = Q K^T` (16 x 64), masks keys after the
// row (and past `t`), folds the tile into its rows' running max `m` and sum `l` (base-2 units:
// `exp2` of the scores times `scale log2 e`), rescales `O` and adds `P V`; a warp whose rows
// all precede the tile skips it. Each lane holds rows `g` and `g + 8` of the warp (lane `l`, `g = l / 4`); a
// row's max and sum are combined over its 4 lanes by shuffles. Writes `y [B, T, H d]` and
// `lse [B, H, T]` (f32, natural log) as attention.cu's `attn_fwd` does, so the backward reads
// either. Deterministic: no atomics, a fixed order of every sum.
#include "kernel_params.cuh"
#include "mma_tiles.cuh"

namespace attention_mma {

// A warp's 16 query rows: their Q fragments, the output accumulators, and each lane's two rows'
// running max `m` (base 2, scaled) and its part of the running sum `l`.
template <int D> struct Rows {
  uint32_t q[D / 16][4];
  float o[D / 8][4];
  float m[2], l[2];
};

// The max over a row's 4 lanes.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Folds the tile's scores into the online softmax: scales them to base 2, masks keys after the
// row and past `t`, updates `m`, rescales `l` and `O`, and leaves in `s` the probabilities
// relative to the new max (the lane's part of their sum added to `l`). The first tile a row
// sees holds key 0, so `m` is finite after it.
template <int D>
__device__ __forceinline__ void online_softmax(float (&s)[TILE / 8][4], Rows<D>& w, int row_lo, int j0, int t,
                                               float scale2) {
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Spot at = spot(row_lo, j0, n, i);
      s[n][i] = at.col <= at.row && at.col < t ? s[n][i] * scale2 : -INFINITY;
      tile_max[i >> 1] = fmaxf(tile_max[i >> 1], s[n][i]);
    }
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(w.m[r], quad_max(tile_max[r]));
    alpha[r] = exp2f(w.m[r] - m_new);  // 0 on the first tile (m = -inf)
    w.m[r] = m_new;
    w.l[r] *= alpha[r];
  }
#pragma unroll
  for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s[n][i] = exp2f(s[n][i] - w.m[i >> 1]);  // 0 where masked
      w.l[i >> 1] += s[n][i];
    }
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w.o[n][i] *= alpha[i >> 1];
  }
}

// Writes the warp's live rows: `y = O / l` (columns below `d`) and `lse = m ln 2 + ln l`.
template <typename H, int D>
__device__ __forceinline__ void finish(const Rows<D>& w, H* y, float* lse, int b, int h, int heads, int row_lo, int t,
                                       int d) {
  const int q = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = w.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row_lo + ((threadIdx.x & 31) >> 2) + 8 * r;
    if (row >= t) continue;
    const float inv = 1.0f / l;
    H* out = y + ((u64)b * t + row) * (u64)heads * d + (u64)h * d;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = 8 * n + 2 * q + c;
        if (col < d) out[col] = store<H, float>(w.o[n][2 * r + c] * inv);
      }
    }
    if (q == 0) lse[((u64)b * heads + h) * t + row] = w.m[r] * LN2 + logf(l);
  }
}

template <typename H, int D>
__device__ void fwd(const H* q, const H* k, const H* v, H* y, float* lse, int heads, int kv_heads, int t, int d,
                    double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh, u64 vst) {
  constexpr int S = Stages<H, D, 2>::count, LD = D + PAD;
  __shared__ __align__(16) H kv[S][2][TILE * LD];  // [stage][K, V]; the Q tile first
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * TILE;
  const int g = h / (heads / kv_heads);
  const int row_lo = i0 + 16 * (threadIdx.x >> 5);
  const H* qh = q + (u64)b * qsb + (u64)h * qsh;
  const H* kh = k + (u64)b * ksb + (u64)g * ksh;
  const H* vh = v + (u64)b * vsb + (u64)g * vsh;
  Rows<D> w;
  stage<H, D>(kv[0][0], qh, qst, i0, t, d, aligned8(qh, qst, d));
  cp_async_commit();
  cp_async_wait(0);
  __syncthreads();
  own_fragments<H, D>(w.q, kv[0][0]);
  zero(w.o);
  w.m[0] = w.m[1] = -INFINITY;
  w.l[0] = w.l[1] = 0.0f;
  __syncthreads();  // every warp has its Q before the first K tile overwrites it
  const float scale2 = (float)scale * LOG2E;
  const bool kvec = aligned8(kh, kst, d), vvec = aligned8(vh, vst, d);
  const int end = t < i0 + TILE ? t : i0 + TILE;  // keys 0 .. end - 1 reach some row of the block
  pipelined<S>(
      (end + TILE - 1) / TILE,
      [&](int tile, int st) {
        stage<H, D>(kv[st][0], kh, kst, tile * TILE, t, d, kvec);
        stage<H, D>(kv[st][1], vh, vst, tile * TILE, t, d, vvec);
      },
      [&](int tile, int st) {
        const int j0 = tile * TILE;
        if (row_lo >= t || j0 > row_lo + 15) return;  // the same for the whole warp
        float s[TILE / 8][4];
        product_nt<H, D, TILE>(s, w.q, kv[st][0]);
        online_softmax<D>(s, w, row_lo, j0, t, scale2);
        product_nn<H, D, TILE>(w.o, s, kv[st][1]);
      });
  finish<H, D>(w, y, lse, b, h, heads, row_lo, t, d);
}

}  // namespace attention_mma

using namespace retort;

// attn_fwd_mma_dD_f16 and _bf16 for head-dim bucket D.
#define MMA_FWD_FOR_DIM(D)                                                                                            \
  template <typename T> __device__ void attn_fwd_mma_d##D ATTN_FWD_PARAMS { attention_mma::fwd<T, D> ATTN_FWD_ARGS; } \
  RETORT_INSTANCE(attn_fwd_mma_d##D, f16, __half, ATTN_FWD_PARAMS, ATTN_FWD_ARGS)                                     \
  RETORT_INSTANCE(attn_fwd_mma_d##D, bf16, __nv_bfloat16, ATTN_FWD_PARAMS, ATTN_FWD_ARGS)

MMA_FWD_FOR_DIM(32)
MMA_FWD_FOR_DIM(64)
MMA_FWD_FOR_DIM(128)
