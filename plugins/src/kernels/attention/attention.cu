// The fused causal attention on the GPU (see mod.rs for the formulas, the layouts and the FLOP
// count), FlashAttention-2 style: no [T, T] tensor, K/V (or Q/dY) tiles staged in shared
// memory, plain FMAs (no tensor cores yet), math in f32 (f64 for f64 storage).
//
// Threads: a block of 128 handles ROWS rows (query rows, or key rows in the dK/dV kernel),
// TPR = 128 / ROWS consecutive threads per row; thread `s` of a row owns the head-dim columns
// `s, s + TPR, s + 2 TPR, ...` (below `d`) of that row's operands and accumulators, in
// registers. A dot product over the head dim is a partial sum per thread, then a butterfly
// over the row's TPR lanes (`__shfl_xor_sync`), which leaves the same (bitwise) sum in every
// lane: the softmax is computed redundantly by the lanes of a row, with no further exchange.
//
// Kernels (each instantiated per head-dim bucket D = 32/64/128/256, `d <= D` at run time, and
// per dtype: `attn_fwd_d64_bf16` ...):
// - attn_fwd:   one block per (query tile, head, batch): online softmax over the key tiles up
//               to the diagonal; writes y [B, T, H d] and lse [B, H, T] (f32; f64 for f64).
// - attn_delta: one warp per (batch, token, head) row: delta = dy . y into [B, H, T].
// - attn_dq:    one block per (query tile, head, batch): dq over the key tiles up to the
//               diagonal, P recomputed from q, k and the saved lse.
// - attn_dkdv:  one block per (key tile, kv head, batch): dk, dv over the group's query heads
//               and the query tiles at or after the diagonal. Each gradient element is summed
//               by one thread in a fixed order: deterministic, no atomics.
// Inputs q/k/v are strided ([B, H, T, d] views with element (b, h, t, c) at
// b sb + h sh + t st + c); the gradients are written through the same kind of strides (the
// flat dq/dk/dv of the unpacked op or the qkv layout of the packed one).
#include "kernel_params.cuh"

using namespace retort;

namespace attention {

constexpr int THREADS = 128;
// Query rows per block of attn_fwd / attn_dq, key rows per block of attn_dkdv.
constexpr int Q_ROWS = 32;
constexpr int K_ROWS = 16;

// Rows of a staged tile pair (K and V, or Q and dY) of head-dim bucket D in accumulator type A:
// both tiles within 48 KB of static shared memory, at most 32 rows.
template <typename A, int D> struct Staged {
  static constexpr int fit = 49152 / (2 * D * (int)sizeof(A));
  static constexpr int rows = fit >= 32 ? 32 : (fit >= 16 ? 16 : 8);
};

// Element (b, h, t, 0) of a strided [B, H, T, d] operand.
struct Strides {
  u64 b, h, t;
  __device__ __forceinline__ u64 at(int bi, int hi, int ti) const {
    return (u64)bi * b + (u64)hi * h + (u64)ti * t;
  }
};

// The sum of `v` over the TPR consecutive lanes of a row (the same value in each lane).
template <int TPR, typename A> __device__ __forceinline__ A row_sum(A v) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads `rows` rows from `row0` of a strided operand (head base `base`) into the shared tile
// `tile [rows][D]` as A, zero past `t` and past `d`.
template <typename T, typename A, int D, int ROWS>
__device__ __forceinline__ void stage(A (*tile)[D], const T* base, u64 st, int row0, int t, int d) {
  for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
    const int r = e / D, c = e % D, row = row0 + r;
    tile[r][c] = row < t && c < d ? load(base[(u64)row * st + c]) : A(0);
  }
}

// The thread's columns of a row of a strided operand (zero past `d`, or for a dead row).
template <typename T, typename A, int C, int TPR>
__device__ __forceinline__ void own_columns(A (&x)[C], const T* row, bool live, int s, int d) {
#pragma unroll
  for (int cc = 0; cc < C; ++cc) {
    const int c = s + TPR * cc;
    x[cc] = live && c < d ? load(row[c]) : A(0);
  }
}

// The thread's part of `x . tile[r]` over its columns.
template <typename A, int C, int TPR, int D>
__device__ __forceinline__ A partial_dot(const A (&x)[C], const A* tile_row, int s) {
  A sum = A(0);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) sum += x[cc] * tile_row[s + TPR * cc];
  return sum;
}

template <typename T, int D>
__device__ void fwd(const T* q, const T* k, const T* v, T* y, AccT<T>* lse, int heads, int kv_heads, int t, int d,
                    double scale_arg, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh,
                    u64 vst) {
  typedef AccT<T> A;
  constexpr int TPR = THREADS / Q_ROWS, C = D / TPR, BN = Staged<A, D>::rows;
  __shared__ A ks[BN][D];
  __shared__ A vs[BN][D];
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * Q_ROWS;
  const int g = h / (heads / kv_heads);
  const int s = threadIdx.x % TPR, i = i0 + threadIdx.x / TPR;
  const bool live = i < t;
  const A scale = A(scale_arg);
  const Strides qs{qsb, qsh, qst}, kss{ksb, ksh, kst}, vss{vsb, vsh, vst};
  A qr[C], acc[C];
  own_columns<T, A, C, TPR>(qr, q + qs.at(b, h, live ? i : 0), live, s, d);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) acc[cc] = A(0);
  A m = neg_inf<A>(), l = A(0);
  const T* kb = k + kss.at(b, g, 0);
  const T* vb = v + vss.at(b, g, 0);
  const int end = t < i0 + Q_ROWS ? t : i0 + Q_ROWS;  // keys 0..end-1 reach some row of the tile
  for (int j0 = 0; j0 < end; j0 += BN) {
    stage<T, A, D, BN>(ks, kb, kst, j0, t, d);
    stage<T, A, D, BN>(vs, vb, vst, j0, t, d);
    __syncthreads();
    A p[BN];
    A tile_max = neg_inf<A>();
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      const A sc = row_sum<TPR>(partial_dot<A, C, TPR, D>(qr, ks[jj], s)) * scale;
      const int j = j0 + jj;
      p[jj] = live && j <= i ? sc : neg_inf<A>();  // j <= i < t
      tile_max = max_(tile_max, p[jj]);
    }
    const A m_new = max_(m, tile_max);
    if (m_new != neg_inf<A>()) {
      const A alpha = exp_(m - m_new);  // 0 while the row is empty
      A sum = A(0);
#pragma unroll
      for (int jj = 0; jj < BN; ++jj) {
        p[jj] = exp_(p[jj] - m_new);  // exp(-inf) = 0 where masked
        sum += p[jj];
      }
      l = l * alpha + sum;
#pragma unroll
      for (int cc = 0; cc < C; ++cc) acc[cc] *= alpha;
#pragma unroll
      for (int jj = 0; jj < BN; ++jj) {
#pragma unroll
        for (int cc = 0; cc < C; ++cc) acc[cc] += p[jj] * vs[jj][s + TPR * cc];
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (!live) return;
  const A inv = A(1) / l;
  T* yrow = y + ((u64)b * t + i) * (u64)heads * d + (u64)h * d;
#pragma unroll
  for (int cc = 0; cc < C; ++cc) {
    const int c = s + TPR * cc;
    if (c < d) yrow[c] = store<T, A>(acc[cc] * inv);
  }
  if (s == 0) lse[((u64)b * heads + h) * t + i] = m + log_(l);
}

// delta = dy . y per (batch, token, head) row of y, dy [B, T, H d] (contiguous), into
// delta [B, H, T]; one warp per row.
template <typename T> __device__ void delta(const T* y, const T* dy, AccT<T>* out, int rows, int heads, int t, int d) {
  typedef AccT<T> A;
  const int row = blockIdx.x * (THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp
  const T* yr = y + (u64)row * d;
  const T* dr = dy + (u64)row * d;
  A sum = A(0);
  for (int c = lane; c < d; c += 32) sum += load(yr[c]) * load(dr[c]);
  sum = warp_sum(sum);
  if (lane == 0) {
    const int h = row % heads, bt = row / heads;
    const int b = bt / t, i = bt % t;
    out[((u64)b * heads + h) * t + i] = sum;
  }
}

// dq = scale sum_j dS_ij k_j, dS_ij = P_ij (dy_i . v_j - delta_i), P_ij = exp(scale q_i . k_j
// - lse_i), over the key tiles up to the diagonal; written at grad + dq_off through the dq
// strides.
template <typename T, int D>
__device__ void dq(const T* q, const T* k, const T* v, const T* dy, const AccT<T>* lse, const AccT<T>* delta_in,
                   T* grad, int heads, int kv_heads, int t, int d, double scale_arg, u64 qsb, u64 qsh, u64 qst,
                   u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dq_off, u64 dqsb, u64 dqsh, u64 dqst) {
  typedef AccT<T> A;
  constexpr int TPR = THREADS / Q_ROWS, C = D / TPR, BN = Staged<A, D>::rows;
  __shared__ A ks[BN][D];
  __shared__ A vs[BN][D];
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * Q_ROWS;
  const int g = h / (heads / kv_heads);
  const int s = threadIdx.x % TPR, i = i0 + threadIdx.x / TPR;
  const bool live = i < t;
  const int ic = live ? i : 0;
  const A scale = A(scale_arg);
  const Strides qs{qsb, qsh, qst}, kss{ksb, ksh, kst}, vss{vsb, vsh, vst}, dqs{dqsb, dqsh, dqst};
  A qr[C], dyr[C], acc[C];
  own_columns<T, A, C, TPR>(qr, q + qs.at(b, h, ic), live, s, d);
  own_columns<T, A, C, TPR>(dyr, dy + ((u64)b * t + ic) * (u64)heads * d + (u64)h * d, live, s, d);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) acc[cc] = A(0);
  const u64 stat = ((u64)b * heads + h) * t + ic;
  const A row_lse = lse[stat], row_delta = delta_in[stat];
  const T* kb = k + kss.at(b, g, 0);
  const T* vb = v + vss.at(b, g, 0);
  const int end = t < i0 + Q_ROWS ? t : i0 + Q_ROWS;
  for (int j0 = 0; j0 < end; j0 += BN) {
    stage<T, A, D, BN>(ks, kb, kst, j0, t, d);
    stage<T, A, D, BN>(vs, vb, vst, j0, t, d);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < BN; ++jj) {
      const A sc = row_sum<TPR>(partial_dot<A, C, TPR, D>(qr, ks[jj], s)) * scale;
      const A dp = row_sum<TPR>(partial_dot<A, C, TPR, D>(dyr, vs[jj], s));
      const bool on = live && j0 + jj <= i;
      const A ds = on ? exp_(sc - row_lse) * (dp - row_delta) : A(0);
#pragma unroll
      for (int cc = 0; cc < C; ++cc) acc[cc] += ds * ks[jj][s + TPR * cc];
    }
    __syncthreads();
  }
  if (!live) return;
  T* out = grad + dq_off + dqs.at(b, h, i);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) {
    const int c = s + TPR * cc;
    if (c < d) out[c] = store<T, A>(acc[cc] * scale);
  }
}

// dk_j = scale sum_i dS_ij q_i, dv_j = sum_i P_ij dy_i over the query heads of kv head g and
// the query rows i >= j; written at grad + dk_off / dv_off through their strides.
template <typename T, int D>
__device__ void dkdv(const T* q, const T* k, const T* v, const T* dy, const AccT<T>* lse, const AccT<T>* delta_in,
                     T* grad, int heads, int kv_heads, int t, int d, double scale_arg, u64 qsb, u64 qsh, u64 qst,
                     u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh, u64 vst, u64 dk_off, u64 dksb, u64 dksh,
                     u64 dkst, u64 dv_off, u64 dvsb, u64 dvsh, u64 dvst) {
  typedef AccT<T> A;
  constexpr int TPR = THREADS / K_ROWS, C = D / TPR, BM = Staged<A, D>::rows;
  __shared__ A qs_tile[BM][D];
  __shared__ A dys[BM][D];
  __shared__ A lses[BM];
  __shared__ A deltas[BM];
  const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * K_ROWS;
  const int rep = heads / kv_heads;
  const int s = threadIdx.x % TPR, j = j0 + threadIdx.x / TPR;
  const bool live = j < t;
  const int jc = live ? j : 0;
  const A scale = A(scale_arg);
  const Strides qs{qsb, qsh, qst}, kss{ksb, ksh, kst}, vss{vsb, vsh, vst};
  const Strides dks{dksb, dksh, dkst}, dvs{dvsb, dvsh, dvst};
  A kr[C], vr[C], dk_acc[C], dv_acc[C];
  own_columns<T, A, C, TPR>(kr, k + kss.at(b, g, jc), live, s, d);
  own_columns<T, A, C, TPR>(vr, v + vss.at(b, g, jc), live, s, d);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) dk_acc[cc] = dv_acc[cc] = A(0);
  const u64 hd = (u64)heads * d;
  for (int h = g * rep; h < (g + 1) * rep; ++h) {
    const T* qb = q + qs.at(b, h, 0);
    const T* dyb = dy + (u64)b * t * hd + (u64)h * d;
    const A* lse_h = lse + ((u64)b * heads + h) * t;
    const A* delta_h = delta_in + ((u64)b * heads + h) * t;
    for (int i0 = j0 / BM * BM; i0 < t; i0 += BM) {
      stage<T, A, D, BM>(qs_tile, qb, qst, i0, t, d);
      stage<T, A, D, BM>(dys, dyb, hd, i0, t, d);
      if (threadIdx.x < BM) {
        const int i = i0 + threadIdx.x;
        lses[threadIdx.x] = i < t ? lse_h[i] : A(0);
        deltas[threadIdx.x] = i < t ? delta_h[i] : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int ii = 0; ii < BM; ++ii) {
        const A sc = row_sum<TPR>(partial_dot<A, C, TPR, D>(kr, qs_tile[ii], s)) * scale;
        const A dp = row_sum<TPR>(partial_dot<A, C, TPR, D>(vr, dys[ii], s));
        const int i = i0 + ii;
        const bool on = live && i >= j && i < t;
        const A p = on ? exp_(sc - lses[ii]) : A(0);
        const A ds = p * (dp - deltas[ii]);
#pragma unroll
        for (int cc = 0; cc < C; ++cc) {
          dv_acc[cc] += p * dys[ii][s + TPR * cc];
          dk_acc[cc] += ds * qs_tile[ii][s + TPR * cc];
        }
      }
      __syncthreads();
    }
  }
  if (!live) return;
  T* dk_out = grad + dk_off + dks.at(b, g, j);
  T* dv_out = grad + dv_off + dvs.at(b, g, j);
#pragma unroll
  for (int cc = 0; cc < C; ++cc) {
    const int c = s + TPR * cc;
    if (c < d) {
      dk_out[c] = store<T, A>(dk_acc[cc] * scale);
      dv_out[c] = store<T, A>(dv_acc[cc]);
    }
  }
}

}  // namespace attention

// The kernels of head-dim bucket D: attn_fwd_dD_*, attn_dq_dD_*, attn_dkdv_dD_*.
#define ATTN_FOR_DIM(D)                                                                                           \
  template <typename T> __device__ void attn_fwd_d##D ATTN_FWD_PARAMS { attention::fwd<T, D> ATTN_FWD_ARGS; }    \
  template <typename T> __device__ void attn_dq_d##D ATTN_DQ_PARAMS { attention::dq<T, D> ATTN_DQ_ARGS; }        \
  template <typename T> __device__ void attn_dkdv_d##D ATTN_DKDV_PARAMS { attention::dkdv<T, D> ATTN_DKDV_ARGS; } \
  RETORT_FOR_DTYPES(attn_fwd_d##D, ATTN_FWD_PARAMS, ATTN_FWD_ARGS)                                                \
  RETORT_FOR_DTYPES(attn_dq_d##D, ATTN_DQ_PARAMS, ATTN_DQ_ARGS)                                                   \
  RETORT_FOR_DTYPES(attn_dkdv_d##D, ATTN_DKDV_PARAMS, ATTN_DKDV_ARGS)

ATTN_FOR_DIM(32)
ATTN_FOR_DIM(64)
ATTN_FOR_DIM(128)
ATTN_FOR_DIM(256)

template <typename T>
__device__ void attn_delta(const T* y, const T* dy, AccT<T>* out, int rows, int heads, int t, int d) {
  attention::delta<T>(y, dy, out, rows, heads, t, d);
}
RETORT_FOR_DTYPES(attn_delta, (const T* y, const T* dy, AccT<T>* out, int rows, int heads, int t, int d),
                  (y, dy, out, rows, heads, t, d))
