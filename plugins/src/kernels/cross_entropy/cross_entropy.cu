// The label-smoothed cross-entropy on the GPU (see mod.rs for the formulas): one block per
// row (token). Forward: one online sweep for the log-normaliser and the sum of logits; writes
// (L, lse) per row in f32 (f64 for f64 logits). Backward: one sweep writing g dL/dz in the
// logits' dtype. A target outside the vocabulary makes the row NaN (targets are checked where
// they are made).
#include "common.cuh"

using namespace retort;

template <typename T>
__device__ void ce_fwd(const T* zs, const uint32_t* targets, typename Acc<T>::type* out, int v, double eps) {
  typedef typename Acc<T>::type A;
  __shared__ Online<A> scratch_o[32];
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* z = zs + row * (size_t)v;
  Online<A> o = online_empty<A>();
  A sum = A(0);
  sweep<UNROLL>(v, [&](int i) { return load(z[i]); }, [&](int, A x) {
    online_push(o, x, A(0));
    sum += x;
  });
  const A lse = online_lse(block_merge(o, scratch_o));
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    const uint32_t y = targets[row];
    const A nll = y < (uint32_t)v ? lse - load(z[y]) : A(NAN);
    const A e = A(eps);
    out[row * 2] = eps > 0.0 ? (A(1) - e) * nll + e * (lse - sum / A(v)) : nll;
    out[row * 2 + 1] = lse;
  }
}

// `stats` per row: (L, lse, g).
template <typename T>
__device__ void ce_bwd(const T* zs, const uint32_t* targets, const typename Acc<T>::type* stats, T* grad, int v,
                       double eps) {
  typedef typename Acc<T>::type A;
  const size_t row = blockIdx.x;
  const T* z = zs + row * (size_t)v;
  T* o = grad + row * (size_t)v;
  const A lse = stats[row * 3 + 1], g = stats[row * 3 + 2];
  const A shift = A(eps / v), hit = A(1.0 - eps);
  const uint32_t y = targets[row];
  if (g == A(0)) {  // a masked row: no gradient, and no reads
    for (int i = threadIdx.x; i < v; i += blockDim.x) o[i] = store<T, A>(A(0));
    return;
  }
  sweep<UNROLL>(v, [&](int i) { return load(z[i]); }, [&](int i, A x) {
    A d = g * (exp_(x - lse) - shift);
    if ((uint32_t)i == y) d = d - g * hit;
    o[i] = store<T, A>(d);
  });
}

RETORT_FOR_DTYPES(ce_fwd, (const T* zs, const uint32_t* targets, Acc<T>::type* out, int v, double eps),
                  (zs, targets, out, v, eps))
RETORT_FOR_DTYPES(ce_bwd,
                  (const T* zs, const uint32_t* targets, const Acc<T>::type* stats, T* grad, int v, double eps),
                  (zs, targets, stats, grad, v, eps))
