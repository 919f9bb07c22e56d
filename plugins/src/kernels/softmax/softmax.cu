// The fused softmax on the GPU (see mod.rs for the formulas): one block per row. Forward: one
// online sweep for the row's maximum and `sum e^{x - m}` over its live columns (all, or with
// `causal` the first `row % v + 1`), then `y = e^{x - m} / sum`, 0 past the live columns.
// Backward from the saved output: `dx = y (gy - sum gy y)` (0 where `y` is). Math in f32 (f64
// for f64 storage).
#include "common.cuh"

using namespace retort;

template <typename T>
__device__ void softmax_fwd(const T* xs, T* ys, int v, int causal) {
  typedef typename Acc<T>::type A;
  __shared__ Online<A> scratch[32];
  const size_t row = blockIdx.x;
  const T* x = xs + row * (size_t)v;
  T* y = ys + row * (size_t)v;
  const int live = causal ? (int)(row % (size_t)v) + 1 : v;
  Online<A> o = online_empty<A>();
  sweep<UNROLL>(live, [&](int i) { return load(x[i]); }, [&](int, A z) { online_push(o, z, A(0)); });
  o = block_merge(o, scratch);
  const A m = o.m, inv = A(1) / o.s;
  sweep<UNROLL>(live, [&](int i) { return load(x[i]); }, [&](int i, A z) { y[i] = store<T, A>(exp_(z - m) * inv); });
  for (int i = live + threadIdx.x; i < v; i += blockDim.x) y[i] = store<T, A>(A(0));
}

template <typename T>
__device__ void softmax_bwd(const T* ys, const T* gys, T* dxs, int v) {
  typedef typename Acc<T>::type A;
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* y = ys + row * (size_t)v;
  const T* gy = gys + row * (size_t)v;
  T* dx = dxs + row * (size_t)v;
  A dot = A(0);
  sweep<UNROLL>(v, [&](int i) { return load(y[i]); }, [&](int i, A p) { dot += p * load(gy[i]); });
  dot = block_sum(dot, scratch);
  sweep<UNROLL>(v, [&](int i) { return load(y[i]); }, [&](int i, A p) { dx[i] = store<T, A>(p * (load(gy[i]) - dot)); });
}

RETORT_FOR_DTYPES(softmax_fwd, (const T* xs, T* ys, int v, int causal), (xs, ys, v, causal))
RETORT_FOR_DTYPES(softmax_bwd, (const T* ys, const T* gys, T* dxs, int v), (ys, gys, dxs, v))
