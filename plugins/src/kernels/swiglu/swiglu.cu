// The fused SwiGLU on the GPU (see mod.rs for the formulas): element-wise, a grid-stride loop
// over the flat tensors; math in f32 (f64 for f64 storage), `s = sigmoid(g)` recomputed in the
// backward.
#include "common.cuh"

using namespace retort;

template <typename A> __device__ __forceinline__ A sigmoid(A g) { return A(1) / (A(1) + exp_(-g)); }

// `y = g sigmoid(g) u`.
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* y, unsigned long long n) {
  typedef typename Acc<T>::type A;
  each_element(n, [&](size_t i) {
    const A gv = load(g[i]);
    y[i] = store<T, A>(gv * sigmoid(gv) * load(u[i]));
  });
}

// `out[i] = dg = dy u s (1 + g (1 - s))`, `out[n + i] = du = dy g s`.
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* out, unsigned long long n) {
  typedef typename Acc<T>::type A;
  each_element(n, [&](size_t i) {
    const A gv = load(g[i]), uv = load(u[i]), d = load(dy[i]);
    const A s = sigmoid(gv);
    out[i] = store<T, A>(d * uv * s * (A(1) + gv * (A(1) - s)));
    out[n + i] = store<T, A>(d * gv * s);
  });
}

RETORT_FOR_DTYPES(swiglu_fwd, (const T* g, const T* u, T* y, unsigned long long n), (g, u, y, n))
RETORT_FOR_DTYPES(swiglu_bwd, (const T* g, const T* u, const T* dy, T* out, unsigned long long n), (g, u, dy, out, n))
