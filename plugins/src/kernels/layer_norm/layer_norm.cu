// The fused LayerNorm on the GPU (see mod.rs for the formulas): one block per row for the
// forward and the backward's `dx`; `dw = sum_rows gy xh` and `db = sum_rows gy` as per-slice
// column sums, then the slices summed in order (deterministic: no atomics). Math in f32 (f64
// for f64 storage); the row statistics in two passes (mean, then the centred squares).
#include "common.cuh"

using namespace retort;

// `(mu, r)` of the block's row `x`: `mu = mean x`, `r = 1 / sqrt(mean (x - mu)^2 + eps)`, to
// every thread.
template <typename T>
__device__ Pair<typename Acc<T>::type> ln_stats(const T* x, int d, double eps, typename Acc<T>::type* scratch) {
  typedef typename Acc<T>::type A;
  A s = A(0);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int, A v) { s += v; });
  const A mu = block_sum(s, scratch) / A(d);
  A q = A(0);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int, A v) { q += (v - mu) * (v - mu); });
  const A var = block_sum(q, scratch) / A(d);
  Pair<A> p;
  p.a = mu;
  p.b = A(1) / sqrt(var + A(eps));
  return p;
}

// `y = (x - mu) r w + b` per row.
template <typename T>
__device__ void ln_fwd(const T* xs, const T* w, const T* b, T* ys, int d, double eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)d;
  T* y = ys + row * (size_t)d;
  const Pair<A> st = ln_stats(x, d, eps, scratch);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) {
    y[i] = store<T, A>((v - st.a) * st.b * load(w[i]) + load(b[i]));
  });
}

// `dx = r (gy w - mean(gy w) - xh mean(gy w xh))` per row; `stats[2 row ..]` = `(mu, r)` for
// the `dw` sums.
template <typename T>
__device__ void ln_bwd(const T* xs, const T* w, const T* gys, T* dxs, typename Acc<T>::type* stats, int d,
                       double eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)d;
  const T* gy = gys + row * (size_t)d;
  T* dx = dxs + row * (size_t)d;
  const Pair<A> st = ln_stats(x, d, eps, scratch);
  const A mu = st.a, r = st.b;
  A s1 = A(0), s2 = A(0);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) {
    const A gh = load(gy[i]) * load(w[i]);
    s1 += gh;
    s2 += gh * ((v - mu) * r);
  });
  const A m1 = block_sum(s1, scratch) / A(d);
  const A m2 = block_sum(s2, scratch) / A(d);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) {
    dx[i] = store<T, A>(r * (load(gy[i]) * load(w[i]) - m1 - (v - mu) * r * m2));
  });
  if (threadIdx.x == 0) {
    stats[2 * row] = mu;
    stats[2 * row + 1] = r;
  }
}

// Per-slice column sums of `gy xh` (k = 0) and `gy` (k = 1) (see `column_partials`).
template <typename T>
__device__ void ln_dwb_partial(const T* xs, const T* gys, const typename Acc<T>::type* stats,
                               typename Acc<T>::type* partials, int rows, int d, int slice_rows) {
  typedef typename Acc<T>::type A;
  column_partials<2>(rows, d, slice_rows, partials, [&](int r, int j, A* acc) {
    const size_t at = (size_t)r * d + j;
    const A g = load(gys[at]);
    acc[0] += g * ((load(xs[at]) - stats[2 * r]) * stats[2 * r + 1]);
    acc[1] += g;
  });
}

// `dw` then `db` (`out[0..2d]`): the slices' partials summed in order.
template <typename T>
__device__ void ln_dwb_finish(const typename Acc<T>::type* partials, T* out, int slices, int d) {
  column_finish<2>(partials, slices, d, out);
}

RETORT_FOR_DTYPES(ln_fwd, (const T* xs, const T* w, const T* b, T* ys, int d, double eps), (xs, w, b, ys, d, eps))
RETORT_FOR_DTYPES(ln_bwd,
                  (const T* xs, const T* w, const T* gys, T* dxs, Acc<T>::type* stats, int d, double eps),
                  (xs, w, gys, dxs, stats, d, eps))
RETORT_FOR_DTYPES(ln_dwb_partial,
                  (const T* xs, const T* gys, const Acc<T>::type* stats, Acc<T>::type* partials, int rows, int d,
                   int slice_rows),
                  (xs, gys, stats, partials, rows, d, slice_rows))
RETORT_FOR_DTYPES(ln_dwb_finish, (const Acc<T>::type* partials, T* out, int slices, int d), (partials, out, slices, d))
