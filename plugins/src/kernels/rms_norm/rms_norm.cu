// The fused RMSNorm on the GPU (see mod.rs for the formulas): one block per row for the
// forward and the backward's `dx`; `dw = sum_rows gy xh` as per-slice column sums, then the
// slices summed in order (deterministic: no atomics). Math in f32 (f64 for f64 storage).
#include "common.cuh"

using namespace retort;

// `1 / sqrt(mean x^2 + eps)` of the block's row `x` of `d` elements, to every thread.
template <typename T>
__device__ typename Acc<T>::type row_inv_rms(const T* x, int d, double eps, typename Acc<T>::type* scratch) {
  typedef typename Acc<T>::type A;
  A ss = A(0);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int, A v) { ss += v * v; });
  ss = block_sum(ss, scratch);
  return A(1) / sqrt(ss / A(d) + A(eps));
}

// `y = x r w` per row.
template <typename T>
__device__ void rms_fwd(const T* xs, const T* w, T* ys, int d, double eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)d;
  T* y = ys + row * (size_t)d;
  const A r = row_inv_rms(x, d, eps, scratch);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) { y[i] = store<T, A>(v * r * load(w[i])); });
}

// `dx = r (gy w - xh mean(gy w xh))` per row; `rs[row] = r` for the `dw` sums.
template <typename T>
__device__ void rms_bwd(const T* xs, const T* w, const T* gys, T* dxs, typename Acc<T>::type* rs, int d,
                        double eps) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)d;
  const T* gy = gys + row * (size_t)d;
  T* dx = dxs + row * (size_t)d;
  const A r = row_inv_rms(x, d, eps, scratch);
  A dot = A(0);  // sum gy w x
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) { dot += load(gy[i]) * load(w[i]) * v; });
  // mean(gh xh) = r dot / d; dx = r gh - x r^2 mean(gh xh).
  const A m = r * r * block_sum(dot, scratch) / A(d);
  sweep<UNROLL>(d, [&](int i) { return load(x[i]); }, [&](int i, A v) {
    dx[i] = store<T, A>(r * (load(gy[i]) * load(w[i])) - v * r * m);
  });
  if (threadIdx.x == 0) rs[row] = r;
}

// Per-slice column sums of `gy xh` (see `column_partials`).
template <typename T>
__device__ void rms_dw_partial(const T* xs, const T* gys, const typename Acc<T>::type* rs,
                               typename Acc<T>::type* partials, int rows, int d, int slice_rows) {
  typedef typename Acc<T>::type A;
  column_partials<1>(rows, d, slice_rows, partials, [&](int r, int j, A* acc) {
    const size_t at = (size_t)r * d + j;
    acc[0] += load(gys[at]) * (load(xs[at]) * rs[r]);
  });
}

// `dw[j]`: the slices' partials summed in order.
template <typename T>
__device__ void rms_dw_finish(const typename Acc<T>::type* partials, T* dw, int slices, int d) {
  column_finish<1>(partials, slices, d, dw);
}

RETORT_FOR_DTYPES(rms_fwd, (const T* xs, const T* w, T* ys, int d, double eps), (xs, w, ys, d, eps))
RETORT_FOR_DTYPES(rms_bwd, (const T* xs, const T* w, const T* gys, T* dxs, Acc<T>::type* rs, int d, double eps),
                  (xs, w, gys, dxs, rs, d, eps))
RETORT_FOR_DTYPES(rms_dw_partial,
                  (const T* xs, const T* gys, const Acc<T>::type* rs, Acc<T>::type* partials, int rows, int d,
                   int slice_rows),
                  (xs, gys, rs, partials, rows, d, slice_rows))
RETORT_FOR_DTYPES(rms_dw_finish, (const Acc<T>::type* partials, T* dw, int slices, int d), (partials, dw, slices, d))
