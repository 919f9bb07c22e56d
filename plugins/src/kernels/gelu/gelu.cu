// The fused GELU on the GPU, tanh approximation (see mod.rs for the formulas): element-wise, a
// grid-stride loop over the flat tensor; math in f32 (f64 for f64 storage), `tanh u`
// recomputed in the backward.
#include "common.cuh"

using namespace retort;

__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

// `sqrt(2 / pi)` and the cubic coefficient.
#define RETORT_GELU_C 0.7978845608028654
#define RETORT_GELU_A 0.044715

// `tanh(c (x + a x^3))`.
template <typename A> __device__ __forceinline__ A gelu_tanh(A x) {
  const A c = A(RETORT_GELU_C), a = A(RETORT_GELU_A);
  return tanh_(c * (x + a * x * x * x));
}

// `y = 0.5 x (1 + tanh u)`.
template <typename T>
__device__ void gelu_fwd(const T* xs, T* ys, unsigned long long n) {
  typedef typename Acc<T>::type A;
  each_element(n, [&](size_t i) {
    const A x = load(xs[i]);
    ys[i] = store<T, A>(A(0.5) * x * (A(1) + gelu_tanh(x)));
  });
}

// `dx = gy (0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 a x^2))`.
template <typename T>
__device__ void gelu_bwd(const T* xs, const T* gys, T* dxs, unsigned long long n) {
  typedef typename Acc<T>::type A;
  const A c = A(RETORT_GELU_C), a = A(RETORT_GELU_A), h = A(0.5);
  each_element(n, [&](size_t i) {
    const A x = load(xs[i]);
    const A th = gelu_tanh(x);
    const A d = h * (A(1) + th) + h * x * (A(1) - th * th) * c * (A(1) + A(3) * a * x * x);
    dxs[i] = store<T, A>(load(gys[i]) * d);
  });
}

RETORT_FOR_DTYPES(gelu_fwd, (const T* xs, T* ys, unsigned long long n), (xs, ys, n))
RETORT_FOR_DTYPES(gelu_bwd, (const T* xs, const T* gys, T* dxs, unsigned long long n), (xs, gys, dxs, n))
