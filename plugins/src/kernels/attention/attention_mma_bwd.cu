// The fused causal attention's backward on tensor cores, for bf16 and f16 storage and head dims
// up to 64 (attention.cu's FMA kernels serve the rest; mod.rs has the formulas). The split of
// attention.cu's backward, on `mma.sync.m16n8k16` (mma.cuh, mma_tiles.cuh): f32 accumulators,
// `P` and `dS` rounded to the storage type for the products that reduce over them. The
// probabilities are recomputed from `q`, `k` and the forward's `lse`; `delta = dy . y` comes
// from attention.cu's `attn_delta`.
//
// - attn_dq_mma:   one block of 4 warps per (64 query rows, head, batch), 16 rows a warp, their
//                  Q and dY rows as A fragments; per key tile up to the diagonal (K, V
//                  row-major and K transposed in shared memory): `S = Q K^T`, `dP = dY V^T`,
//                  `dS = P (dP - delta)`, `dQ += dS K`.
// - attn_dkdv_mma: one block per (64 keys, kv head, batch), 16 keys a warp, their K and V rows
//                  as A fragments; per query head of the group and query tile at or after the
//                  diagonal (Q, dY row-major and transposed, and the rows' lse and delta):
//                  `S^T = K Q^T`, `dP^T = V dY^T`, `dV += P^T dY`, `dK += dS^T Q`.
// Every gradient element is summed by one lane in a fixed order: deterministic, no atomics.
#include "mma_tiles.cuh"

namespace attention_mma {

// The staged tiles of the dq kernel: the Q and dY tiles first (in `ks`, `vs`), then per step the
// key tile's K and V row-major and K transposed.
template <typename H, int D> struct DqTiles {
  H ks[TILE * (D + PAD)];
  H vs[TILE * (D + PAD)];
  H kt[D * (TILE + PAD)];
};

// `dS = P (dP - delta)` in place of `dp`, with `P = exp2(s scale2 - lse2)` of the scores `s`
// where the key is live (`key <= query < t`), else 0; `lse2` and `delta` per (query) row of the
// accumulators (`rows`) or column (`!rows`), read by `stat(row or column)`.
template <bool ROWS, typename Stat, typename Live>
__device__ __forceinline__ void softmax_grad(float (&p)[TILE / 8][4], float (&dp)[TILE / 8][4], int lo, int col0,
                                             float scale2, Live live, Stat stat) {
#pragma unroll
  for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Spot at = spot(lo, col0, n, i);
      const float2 st = stat(ROWS ? at.row : at.col);  // (lse2, delta)
      const float pij = live(at) ? exp2f(p[n][i] * scale2 - st.x) : 0.0f;
      p[n][i] = pij;
      dp[n][i] = pij * (dp[n][i] - st.y);
    }
  }
}

// Writes `scale x` of the warp's 16 rows from `lo` (rows below `t`, columns below `d`) at
// `out + row * st + col`.
template <typename H, int D>
__device__ __forceinline__ void write_rows(const float (&x)[D / 8][4], H* out, u64 st, int lo, int t, int d,
                                           float scale) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Spot at = spot(lo, 0, n, i);
      if (at.row < t && at.col < d) out[(u64)at.row * st + at.col] = store<H, float>(x[n][i] * scale);
    }
  }
}

template <typename H, int D>
__device__ void dq(const H* q, const H* k, const H* v, const H* dy, const float* lse, const float* delta, H* grad,
                   int heads, int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh,
                   u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dq_off, u64 dqsb, u64 dqsh, u64 dqst) {
  __shared__ __align__(16) DqTiles<H, D> sm;
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * TILE;
  const int g = h / (heads / kv_heads);
  const int row_lo = i0 + 16 * (threadIdx.x >> 5);
  const u64 hd = (u64)heads * d;
  const H* qh = q + (u64)b * qsb + (u64)h * qsh;
  const H* dyh = dy + (u64)b * t * hd + (u64)h * d;
  const H* kh = k + (u64)b * ksb + (u64)g * ksh;
  const H* vh = v + (u64)b * vsb + (u64)g * vsh;
  stage_rows<H, D>(sm.ks, qh, qst, i0, t, d, aligned8(qh, qst, d));
  stage_rows<H, D>(sm.vs, dyh, hd, i0, t, d, aligned8(dyh, hd, d));
  __syncthreads();
  uint32_t qf[D / 16][4], dyf[D / 16][4];
  own_fragments<H, D>(qf, sm.ks);
  own_fragments<H, D>(dyf, sm.vs);
  __syncthreads();
  // The lane's two rows' (lse2, delta).
  float2 stats[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_lo + ((threadIdx.x & 31) >> 2) + 8 * r;
    const u64 at = ((u64)b * heads + h) * t + row;
    stats[r] = row < t ? make_float2(lse[at] * LOG2E, delta[at]) : make_float2(0.0f, 0.0f);
  }
  const float scale2 = (float)scale * LOG2E;
  const bool kvec = aligned8(kh, kst, d), vvec = aligned8(vh, vst, d);
  float acc[D / 8][4];
  zero(acc);
  const int end = t < i0 + TILE ? t : i0 + TILE;
  for (int j0 = 0; j0 < end; j0 += TILE) {
    stage_rows<H, D>(sm.ks, kh, kst, j0, t, d, kvec);
    stage_rows<H, D>(sm.vs, vh, vst, j0, t, d, vvec);
    stage_transposed<H, D>(sm.kt, kh, kst, j0, t, d, kvec);
    __syncthreads();
    if (row_lo < t && j0 <= row_lo + 15) {  // the same for the whole warp
      float s[TILE / 8][4], dp[TILE / 8][4];
      product_nt<H, D>(s, qf, sm.ks);
      product_nt<H, D>(dp, dyf, sm.vs);
      softmax_grad<true>(
          s, dp, row_lo, j0, scale2, [&](Spot at) { return at.col <= at.row && at.col < t; },
          [&](int row) { return stats[(row - row_lo) >> 3 & 1]; });
      product_nn<H, D>(acc, dp, sm.kt);
    }
    __syncthreads();
  }
  write_rows<H, D>(acc, grad + dq_off + (u64)b * dqsb + (u64)h * dqsh, dqst, row_lo, t, d, (float)scale);
}

// The staged tiles of the dK/dV kernel: the block's K and V first (in `qs`, `dys`), then per
// step a query tile's Q and dY row-major and transposed, and its rows' lse (base 2) and delta.
template <typename H, int D> struct DkdvTiles {
  H qs[TILE * (D + PAD)];
  H dys[TILE * (D + PAD)];
  H qt[D * (TILE + PAD)];
  H dyt[D * (TILE + PAD)];
  float2 stats[TILE];
};

template <typename H, int D>
__device__ void dkdv(const H* q, const H* k, const H* v, const H* dy, const float* lse, const float* delta, H* grad,
                     int heads, int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh,
                     u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dk_off, u64 dksb, u64 dksh, u64 dkst, u64 dv_off,
                     u64 dvsb, u64 dvsh, u64 dvst) {
  __shared__ __align__(16) DkdvTiles<H, D> sm;
  const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * TILE;
  const int rep = heads / kv_heads;
  const int key_lo = j0 + 16 * (threadIdx.x >> 5);
  const u64 hd = (u64)heads * d;
  const H* kh = k + (u64)b * ksb + (u64)g * ksh;
  const H* vh = v + (u64)b * vsb + (u64)g * vsh;
  stage_rows<H, D>(sm.qs, kh, kst, j0, t, d, aligned8(kh, kst, d));
  stage_rows<H, D>(sm.dys, vh, vst, j0, t, d, aligned8(vh, vst, d));
  __syncthreads();
  uint32_t kf[D / 16][4], vf[D / 16][4];
  own_fragments<H, D>(kf, sm.qs);
  own_fragments<H, D>(vf, sm.dys);
  __syncthreads();
  const float scale2 = (float)scale * LOG2E;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    const H* qh = q + (u64)b * qsb + (u64)h * qsh;
    const H* dyh = dy + (u64)b * t * hd + (u64)h * d;
    const u64 stat0 = ((u64)b * heads + h) * t;
    const bool qvec = aligned8(qh, qst, d), dyvec = aligned8(dyh, hd, d);
    for (int i0 = j0; i0 < t; i0 += TILE) {
      stage_rows<H, D>(sm.qs, qh, qst, i0, t, d, qvec);
      stage_rows<H, D>(sm.dys, dyh, hd, i0, t, d, dyvec);
      stage_transposed<H, D>(sm.qt, qh, qst, i0, t, d, qvec);
      stage_transposed<H, D>(sm.dyt, dyh, hd, i0, t, d, dyvec);
      if (threadIdx.x < TILE) {
        const int i = i0 + threadIdx.x;
        sm.stats[threadIdx.x] = i < t ? make_float2(lse[stat0 + i] * LOG2E, delta[stat0 + i]) : make_float2(0.0f, 0.0f);
      }
      __syncthreads();
      if (key_lo < t && key_lo <= i0 + TILE - 1) {  // the same for the whole warp
        float p[TILE / 8][4], ds[TILE / 8][4];
        product_nt<H, D>(p, kf, sm.qs);
        product_nt<H, D>(ds, vf, sm.dys);
        softmax_grad<false>(
            p, ds, key_lo, i0, scale2, [&](Spot at) { return at.col >= at.row && at.col < t; },
            [&](int col) { return sm.stats[col - i0]; });
        product_nn<H, D>(dv, p, sm.dyt);
        product_nn<H, D>(dk, ds, sm.qt);
      }
      __syncthreads();
    }
  }
  write_rows<H, D>(dk, grad + dk_off + (u64)b * dksb + (u64)g * dksh, dkst, key_lo, t, d, (float)scale);
  write_rows<H, D>(dv, grad + dv_off + (u64)b * dvsb + (u64)g * dvsh, dvst, key_lo, t, d, 1.0f);
}

}  // namespace attention_mma

using namespace retort;
using attention_mma::u64;

#define MMA_DQ_PARAMS                                                                                              \
  (const T* q, const T* k, const T* v, const T* dy, const float* lse, const float* delta, T* grad, int heads,     \
   int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb,       \
   u64 vsh, u64 vst, u64 dq_off, u64 dqsb, u64 dqsh, u64 dqst)
#define MMA_DQ_ARGS                                                                                           \
  (q, k, v, dy, lse, delta, grad, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, \
   dq_off, dqsb, dqsh, dqst)
#define MMA_DKDV_PARAMS                                                                                            \
  (const T* q, const T* k, const T* v, const T* dy, const float* lse, const float* delta, T* grad, int heads,     \
   int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb,       \
   u64 vsh, u64 vst, u64 dk_off, u64 dksb, u64 dksh, u64 dkst, u64 dv_off, u64 dvsb, u64 dvsh, u64 dvst)
#define MMA_DKDV_ARGS                                                                                         \
  (q, k, v, dy, lse, delta, grad, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, \
   dk_off, dksb, dksh, dkst, dv_off, dvsb, dvsh, dvst)

// attn_dq_mma_dD_{f16,bf16} and attn_dkdv_mma_dD_{f16,bf16} for head-dim bucket D.
#define MMA_BWD_FOR_DIM(D)                                                                                       \
  template <typename T> __device__ void attn_dq_mma_d##D MMA_DQ_PARAMS { attention_mma::dq<T, D> MMA_DQ_ARGS; } \
  template <typename T> __device__ void attn_dkdv_mma_d##D MMA_DKDV_PARAMS {                                    \
    attention_mma::dkdv<T, D> MMA_DKDV_ARGS;                                                                     \
  }                                                                                                              \
  RETORT_INSTANCE(attn_dq_mma_d##D, f16, __half, MMA_DQ_PARAMS, MMA_DQ_ARGS)                                     \
  RETORT_INSTANCE(attn_dq_mma_d##D, bf16, __nv_bfloat16, MMA_DQ_PARAMS, MMA_DQ_ARGS)                             \
  RETORT_INSTANCE(attn_dkdv_mma_d##D, f16, __half, MMA_DKDV_PARAMS, MMA_DKDV_ARGS)                               \
  RETORT_INSTANCE(attn_dkdv_mma_d##D, bf16, __nv_bfloat16, MMA_DKDV_PARAMS, MMA_DKDV_ARGS)

MMA_BWD_FOR_DIM(32)
MMA_BWD_FOR_DIM(64)
