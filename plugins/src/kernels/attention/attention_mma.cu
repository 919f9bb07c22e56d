// The fused causal attention's forward on tensor cores, for bf16 and f16 storage and head dims up
// to 128 (the FMA kernels of attention.cu serve every other dtype and size; mod.rs has the
// formulas, the layouts and the FLOP count). FlashAttention-2's forward (Dao, 2023) on
// `mma.sync.m16n8k16` (mma.cuh): f32 accumulators, the probabilities rounded to the storage
// type for `P V`, the online softmax in f32 on the accumulators' registers.
//
// One block of 4 warps per (64 query rows, head, batch); warp `w` owns query rows
// `16 w .. 16 w + 15` of the block. The block stages its Q tile once (the warps keep their rows
// as A fragments in registers), then for each tile of 64 keys up to the diagonal: K row-major
// and V transposed (`V^T [dim][key]`, so both products read their B fragments as words along
// k) in shared memory, rows padded by 8 values so that a warp's fragment loads hit 32 distinct
// banks. Per tile each warp computes `S = Q K^T` (16 x 64), masks keys after the row (and past
// `t`), folds the tile into its rows' running max `m` and sum `l` (base-2 units: `exp2` of the
// scores times `scale log2 e`), rescales `O` and adds `P V`; a warp whose rows all precede the
// tile skips it. Each lane holds rows `g` and `g + 8` of the warp (lane `l`, `g = l / 4`); a
// row's max and sum are combined over its 4 lanes by shuffles. Writes `y [B, T, H d]` and
// `lse [B, H, T]` (f32, natural log) as attention.cu's `attn_fwd` does, so the backward reads
// either. Deterministic: no atomics, a fixed order of every sum.
#include "common.cuh"
#include "mma.cuh"

using namespace retort;

typedef unsigned long long u64;

namespace attention_mma {

constexpr int WARPS = 4;
constexpr int THREADS = 32 * WARPS;
// Query rows per block (16 per warp) and keys per staged tile.
constexpr int BM = 16 * WARPS;
constexpr int BN = 64;
// Values after each staged row (conflict-free fragment loads; rows stay 16-byte aligned).
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Whether a head's rows can be copied 8 values (16 bytes) at a time.
template <typename H> __device__ __forceinline__ bool aligned8(const H* head, u64 st, int d) {
  return d % 8 == 0 && st % 8 == 0 && ((u64)(uintptr_t)head & 15) == 0;
}

// Rows `row0 ..` of a head (row pitch `st`) into `tile [ROWS][D + PAD]`, zero past `t` and `d`.
template <typename H, int ROWS, int D>
__device__ __forceinline__ void stage_rows(H* tile, const H* head, u64 st, int row0, int t, int d, bool vec) {
  constexpr int LD = D + PAD;
  if (vec) {
    for (int e = threadIdx.x; e < ROWS * (D / 8); e += THREADS) {
      const int r = e / (D / 8), c = e % (D / 8) * 8, row = row0 + r;
      copy8(tile + r * LD + c, row < t && c < d ? head + (u64)row * st + c : nullptr);
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
      const int r = e / D, c = e % D, row = row0 + r;
      tile[r * LD + c] = row < t && c < d ? head[(u64)row * st + c] : store<H, float>(0.0f);
    }
  }
}

// Keys `row0 .. row0 + BN - 1` of a value head transposed into `vt [D][BN + PAD]`
// (`vt[c][j] = v[row0 + j][c]`), two keys per word, zero past `t` and `d`.
template <typename H, int D>
__device__ __forceinline__ void stage_transposed(H* vt, const H* head, u64 st, int row0, int t, int d) {
  constexpr int LD = BN + PAD;
  const H zero = store<H, float>(0.0f);
  for (int e = threadIdx.x; e < (BN / 2) * D; e += THREADS) {
    const int j = 2 * (e / D), c = e % D, row = row0 + j;
    const H lo = row < t && c < d ? head[(u64)row * st + c] : zero;
    const H hi = row + 1 < t && c < d ? head[(u64)(row + 1) * st + c] : zero;
    put_word(vt + c * LD + j, half_bits(lo) | (half_bits(hi) << 16));
  }
}

// A warp's 16 query rows: their Q fragments, the output accumulators, and each lane's two rows'
// running max `m` (base 2, scaled) and its part of the running sum `l`.
template <int D> struct Rows {
  uint32_t q[D / 16][4];
  float o[D / 8][4];
  float m[2], l[2];
};

// `s[n] = Q K[8n .. 8n + 7]^T` for the staged keys (f32).
template <typename H, int D>
__device__ __forceinline__ void scores(float (&s)[BN / 8][4], const Rows<D>& w, const H* ks) {
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t b[2];
      load_b(b, ks, D + PAD, 8 * n, 16 * kk);
      mma_16816<H>(s[n], w.q[kk], b);
    }
  }
}

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
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], Rows<D>& w, int row_lo, int j0, int t,
                                               float scale2) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row_lo + g + 8 * (i >> 1), key = j0 + 8 * n + 2 * q + (i & 1);
      s[n][i] = key <= row && key < t ? s[n][i] * scale2 : -INFINITY;
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
  for (int n = 0; n < BN / 8; ++n) {
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

// `O += P V` over the staged keys: the probabilities' accumulator layout is the A fragment's
// (key tiles 2kk and 2kk + 1 make the 16 keys of step kk), rounded to `H`.
template <typename H, int D>
__device__ __forceinline__ void accumulate(Rows<D>& w, const float (&p)[BN / 8][4], const H* vt) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const uint32_t a[4] = {
        pack_pair<H>(p[2 * kk][0], p[2 * kk][1]), pack_pair<H>(p[2 * kk][2], p[2 * kk][3]),
        pack_pair<H>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack_pair<H>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      uint32_t b[2];
      load_b(b, vt, BN + PAD, 8 * n, 16 * kk);
      mma_16816<H>(w.o[n], a, b);
    }
  }
}

// Writes the warp's live rows: `y = O / l` (columns below `d`) and `lse = m ln 2 + ln l`.
template <typename H, int D>
__device__ __forceinline__ void finish(const Rows<D>& w, H* y, float* lse, int b, int h, int heads, int row_lo, int t,
                                       int d) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = w.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = row_lo + g + 8 * r;
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
  __shared__ __align__(16) H ks[BN * (D + PAD)];  // the Q tile first (BM == BN)
  __shared__ __align__(16) H vt[D * (BN + PAD)];
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * BM;
  const int g = h / (heads / kv_heads);
  const int warp = threadIdx.x >> 5, row_lo = i0 + 16 * warp;
  const H* qh = q + (u64)b * qsb + (u64)h * qsh;
  const H* kh = k + (u64)b * ksb + (u64)g * ksh;
  const H* vh = v + (u64)b * vsb + (u64)g * vsh;
  Rows<D> w;
  stage_rows<H, BM, D>(ks, qh, qst, i0, t, d, aligned8(qh, qst, d));
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(w.q[kk], ks, D + PAD, 16 * warp, 16 * kk);
#pragma unroll
  for (int n = 0; n < D / 8; ++n) w.o[n][0] = w.o[n][1] = w.o[n][2] = w.o[n][3] = 0.0f;
  w.m[0] = w.m[1] = -INFINITY;
  w.l[0] = w.l[1] = 0.0f;
  __syncthreads();  // every warp has its Q before the first K tile overwrites it
  const float scale2 = (float)scale * LOG2E;
  const bool kvec = aligned8(kh, kst, d);
  const int end = t < i0 + BM ? t : i0 + BM;  // keys 0 .. end - 1 reach some row of the block
  for (int j0 = 0; j0 < end; j0 += BN) {
    stage_rows<H, BN, D>(ks, kh, kst, j0, t, d, kvec);
    stage_transposed<H, D>(vt, vh, vst, j0, t, d);
    __syncthreads();
    if (row_lo < t && j0 <= row_lo + 15) {  // the same for the whole warp
      float s[BN / 8][4];
      scores<H, D>(s, w, ks);
      online_softmax<D>(s, w, row_lo, j0, t, scale2);
      accumulate<H, D>(w, s, vt);
    }
    __syncthreads();
  }
  finish<H, D>(w, y, lse, b, h, heads, row_lo, t, d);
}

}  // namespace attention_mma

#define MMA_FWD_PARAMS                                                                                         \
  (const T* q, const T* k, const T* v, T* y, float* lse, int heads, int kv_heads, int t, int d, double scale, \
   u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh, u64 vst)
#define MMA_FWD_ARGS (q, k, v, y, lse, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst)

// attn_fwd_mma_dD_f16 and _bf16 for head-dim bucket D.
#define MMA_FWD_FOR_DIM(D)                                                                                         \
  template <typename T> __device__ void attn_fwd_mma_d##D MMA_FWD_PARAMS { attention_mma::fwd<T, D> MMA_FWD_ARGS; } \
  RETORT_INSTANCE(attn_fwd_mma_d##D, f16, __half, MMA_FWD_PARAMS, MMA_FWD_ARGS)                                   \
  RETORT_INSTANCE(attn_fwd_mma_d##D, bf16, __nv_bfloat16, MMA_FWD_PARAMS, MMA_FWD_ARGS)

MMA_FWD_FOR_DIM(32)
MMA_FWD_FOR_DIM(64)
MMA_FWD_FOR_DIM(128)
