// The fused bias add on the GPU (see mod.rs): the forward one block per row; the bias gradient
// `db = sum_rows gy` as per-slice column sums, then the slices summed in order (deterministic:
// no atomics). Math in f32 (f64 for f64 storage): a half-precision sum is the f32 sum rounded
// to nearest even.
#include "common.cuh"

using namespace retort;

// `y = x + b` per row of `n`.
template <typename T>
__device__ void bias_fwd(const T* xs, const T* b, T* ys, int n) {
  typedef typename Acc<T>::type A;
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)n;
  T* y = ys + row * (size_t)n;
  sweep<UNROLL>(n, [&](int i) { return load(x[i]); }, [&](int i, A v) { y[i] = store<T, A>(v + load(b[i])); });
}

// Per-slice column sums of `gy` (see `column_partials`).
template <typename T>
__device__ void sum_rows_partial(const T* gys, typename Acc<T>::type* partials, int rows, int n, int slice_rows) {
  typedef typename Acc<T>::type A;
  column_partials<1>(rows, n, slice_rows, partials,
                     [&](int r, int j, A* acc) { acc[0] += load(gys[(size_t)r * n + j]); });
}

// `db[j]`: the slices' partials summed in order.
template <typename T>
__device__ void sum_rows_finish(const typename Acc<T>::type* partials, T* db, int slices, int n) {
  column_finish<1>(partials, slices, n, db);
}

RETORT_FOR_DTYPES(bias_fwd, (const T* xs, const T* b, T* ys, int n), (xs, b, ys, n))
RETORT_FOR_DTYPES(sum_rows_partial, (const T* gys, Acc<T>::type* partials, int rows, int n, int slice_rows),
                  (gys, partials, rows, n, slice_rows))
RETORT_FOR_DTYPES(sum_rows_finish, (const Acc<T>::type* partials, T* db, int slices, int n),
                  (partials, db, slices, n))
