// The fused causal attention's backward on tensor cores, for bf16 and f16 storage and head dims
// up to 128 (attention.cu's FMA kernels serve the rest; mod.rs has the formulas). The split of
// attention.cu's backward, on `mma.sync.m16n8k16` (mma.cuh, mma_tiles.cuh): f32 accumulators,
// `P` and `dS` rounded to the storage type for the products that reduce over them. The
// probabilities are recomputed from `q`, `k` and the forward's `lse`; `delta = dy . y` comes
// from attention.cu's `attn_delta`. Tiles are staged row-major by `cp.async` in a two-stage
// pipeline (`ldmatrix` reads them transposed where a product reduces over their rows), 64 rows
// a tile, 32 for head dims above 64.
//
// - attn_dq_mma:   one block of 4 warps per (64 query rows, head, batch), 16 rows a warp, their
//                  Q and dY rows as A fragments; per key tile up to the diagonal (K and V):
//                  `S = Q K^T`, `dP = dY V^T`, `dS = P (dP - delta)`, `dQ += dS K`.
// - attn_dkdv_mma: one block per (64 keys, kv head, batch), 16 keys a warp, their K and V rows
//                  as A fragments; per query head of the group and query tile at or after the
//                  diagonal (Q, dY, and the rows' lse and delta): `S^T = K Q^T`,
//                  `dP^T = V dY^T`, `dV += P^T dY`, `dK += dS^T Q`.
// Every gradient element is summed by one lane in a fixed order: deterministic, no atomics.
#include "kernel_params.cuh"
#include "mma_tiles.cuh"

namespace attention_mma {

// `dS = P (dP - delta)` in place of `dp`, with `P = exp2(s scale2 - lse2)` of the scores `s`
// where the key is live (`key <= query < t`), else 0; `lse2` and `delta` per (query) row of the
// accumulators (`ROWS`) or column (`!ROWS`), read by `stat(row or column)`.
template <bool ROWS, int N, typename Stat, typename Live>
__device__ __forceinline__ void softmax_grad(float (&p)[N / 8][4], float (&dp)[N / 8][4], int lo, int col0,
                                             float scale2, Live live, Stat stat) {
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
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

// Rows of the staged tiles of head dim `D`: 64, or 32 for `D > 64` (so that a warp's scores,
// their gradients and its `16 x D` accumulators fit in its registers).
template <int D> struct Staged {
  static constexpr int rows = D > 64 ? 32 : TILE;
};

// Stages the block's own rows of two operands (`a`, `b` of head bases `ah`, `bh`, row pitches
// `as`, `bs`) into `ta`, `tb` and loads the warp's A fragments of both; the tiles are free again
// on return.
template <typename H, int D>
__device__ __forceinline__ void own_rows(uint32_t (&fa)[D / 16][4], uint32_t (&fb)[D / 16][4], H* ta, H* tb,
                                         const H* ah, u64 as, const H* bh, u64 bs, int row0, int t, int d) {
  stage<H, D>(ta, ah, as, row0, t, d, aligned8(ah, as, d));
  stage<H, D>(tb, bh, bs, row0, t, d, aligned8(bh, bs, d));
  cp_async_commit();
  cp_async_wait(0);
  __syncthreads();
  own_fragments<H, D>(fa, ta);
  own_fragments<H, D>(fb, tb);
  __syncthreads();
}

template <typename H, int D>
__device__ void dq(const H* q, const H* k, const H* v, const H* dy, const float* lse, const float* delta, H* grad,
                   int heads, int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh,
                   u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dq_off, u64 dqsb, u64 dqsh, u64 dqst) {
  constexpr int N = Staged<D>::rows, S = Stages<H, D, 2, N>::count, LD = D + PAD;
  __shared__ __align__(16) H kv[S][2][N * LD];  // [stage][K, V]; the Q and dY tiles first
  static_assert(S * 2 * N >= 2 * TILE, "the stages hold the block's own two tiles");
  H* own = &kv[0][0][0];
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * TILE;
  const int g = h / (heads / kv_heads);
  const int row_lo = i0 + 16 * (threadIdx.x >> 5);
  const u64 hd = (u64)heads * d;
  const H* kh = k + (u64)b * ksb + (u64)g * ksh;
  const H* vh = v + (u64)b * vsb + (u64)g * vsh;
  uint32_t qf[D / 16][4], dyf[D / 16][4];
  own_rows<H, D>(qf, dyf, own, own + TILE * LD, q + (u64)b * qsb + (u64)h * qsh, qst, dy + (u64)b * t * hd + (u64)h * d,
                 hd, i0, t, d);
  float2 stats[2];  // the lane's two rows' (lse2, delta)
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
  pipelined<S>(
      (end + N - 1) / N,
      [&](int tile, int st) {
        stage<H, D, N>(kv[st][0], kh, kst, tile * N, t, d, kvec);
        stage<H, D, N>(kv[st][1], vh, vst, tile * N, t, d, vvec);
      },
      [&](int tile, int st) {
        const int j0 = tile * N;
        if (row_lo >= t || j0 > row_lo + 15) return;  // the same for the whole warp
        float s[N / 8][4], dp[N / 8][4];
        product_nt<H, D, N>(s, qf, kv[st][0]);
        product_nt<H, D, N>(dp, dyf, kv[st][1]);
        softmax_grad<true, N>(
            s, dp, row_lo, j0, scale2, [&](Spot at) { return at.col <= at.row && at.col < t; },
            [&](int row) { return stats[(row - row_lo) >> 3 & 1]; });
        product_nn<H, D, N>(acc, dp, kv[st][0]);
      });
  write_rows<H, D>(acc, grad + dq_off + (u64)b * dqsb + (u64)h * dqsh, dqst, row_lo, t, d, (float)scale);
}

template <typename H, int D>
__device__ void dkdv(const H* q, const H* k, const H* v, const H* dy, const float* lse, const float* delta, H* grad,
                     int heads, int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh,
                     u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dk_off, u64 dksb, u64 dksh, u64 dkst, u64 dv_off,
                     u64 dvsb, u64 dvsh, u64 dvst) {
  constexpr int N = Staged<D>::rows, S = Stages<H, D, 2, N>::count, LD = D + PAD;
  __shared__ __align__(16) H qdy[S][2][N * LD];  // [stage][Q, dY]; the K and V tiles first
  __shared__ float2 stats[S][N];                 // the staged query rows' (lse2, delta)
  static_assert(S * 2 * N >= 2 * TILE, "the stages hold the block's own two tiles");
  H* own = &qdy[0][0][0];
  const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * TILE;
  const int rep = heads / kv_heads;
  const int key_lo = j0 + 16 * (threadIdx.x >> 5);
  const u64 hd = (u64)heads * d;
  uint32_t kf[D / 16][4], vf[D / 16][4];
  own_rows<H, D>(kf, vf, own, own + TILE * LD, k + (u64)b * ksb + (u64)g * ksh, kst, v + (u64)b * vsb + (u64)g * vsh,
                 vst, j0, t, d);
  const float scale2 = (float)scale * LOG2E;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  // Tile set `i`: query head `g rep + i / per_head`, query rows from `j0 + (i % per_head) N`
  // (the tiles at or after the diagonal).
  const int per_head = (t - j0 + N - 1) / N;
  auto head_of = [&](int i) { return g * rep + i / per_head; };
  auto row0_of = [&](int i) { return j0 + i % per_head * N; };
  pipelined<S>(
      rep * per_head,
      [&](int i, int st) {
        const int h = head_of(i), i0 = row0_of(i);
        const H* qh = q + (u64)b * qsb + (u64)h * qsh;
        const H* dyh = dy + (u64)b * t * hd + (u64)h * d;
        stage<H, D, N>(qdy[st][0], qh, qst, i0, t, d, aligned8(qh, qst, d));
        stage<H, D, N>(qdy[st][1], dyh, hd, i0, t, d, aligned8(dyh, hd, d));
        if (threadIdx.x < N) {
          const int row = i0 + threadIdx.x;
          const u64 at = ((u64)b * heads + h) * t + row;
          stats[st][threadIdx.x] = row < t ? make_float2(lse[at] * LOG2E, delta[at]) : make_float2(0.0f, 0.0f);
        }
      },
      [&](int i, int st) {
        const int i0 = row0_of(i);
        if (key_lo >= t || key_lo > i0 + N - 1) return;  // the same for the whole warp
        float p[N / 8][4], ds[N / 8][4];
        product_nt<H, D, N>(p, kf, qdy[st][0]);
        product_nt<H, D, N>(ds, vf, qdy[st][1]);
        softmax_grad<false, N>(
            p, ds, key_lo, i0, scale2, [&](Spot at) { return at.col >= at.row && at.col < t; },
            [&](int col) { return stats[st][col - i0]; });
        product_nn<H, D, N>(dv, p, qdy[st][1]);
        product_nn<H, D, N>(dk, ds, qdy[st][0]);
      });
  write_rows<H, D>(dk, grad + dk_off + (u64)b * dksb + (u64)g * dksh, dkst, key_lo, t, d, (float)scale);
  write_rows<H, D>(dv, grad + dv_off + (u64)b * dvsb + (u64)g * dvsh, dvst, key_lo, t, d, 1.0f);
}

}  // namespace attention_mma

using namespace retort;

// attn_dq_mma_dD_{f16,bf16} and attn_dkdv_mma_dD_{f16,bf16} for head-dim bucket D.
#define MMA_BWD_FOR_DIM(D)                                                                                        \
  template <typename T> __device__ void attn_dq_mma_d##D ATTN_DQ_PARAMS { attention_mma::dq<T, D> ATTN_DQ_ARGS; } \
  template <typename T> __device__ void attn_dkdv_mma_d##D ATTN_DKDV_PARAMS {                                     \
    attention_mma::dkdv<T, D> ATTN_DKDV_ARGS;                                                                     \
  }                                                                                                               \
  RETORT_INSTANCE(attn_dq_mma_d##D, f16, __half, ATTN_DQ_PARAMS, ATTN_DQ_ARGS)                                    \
  RETORT_INSTANCE(attn_dq_mma_d##D, bf16, __nv_bfloat16, ATTN_DQ_PARAMS, ATTN_DQ_ARGS)                            \
  RETORT_INSTANCE(attn_dkdv_mma_d##D, f16, __half, ATTN_DKDV_PARAMS, ATTN_DKDV_ARGS)                              \
  RETORT_INSTANCE(attn_dkdv_mma_d##D, bf16, __nv_bfloat16, ATTN_DKDV_PARAMS, ATTN_DKDV_ARGS)

MMA_BWD_FOR_DIM(32)
MMA_BWD_FOR_DIM(64)
MMA_BWD_FOR_DIM(128)
