// The AdamW update on the GPU, in place (see mod.rs for the formula): one thread per element
// (grid-stride), in the parameter's element type as on the CPU.
#include "common.cuh"

template <typename T>
__device__ void adamw(T* w, const T* g, T* m, T* v, size_t n, double b1, double b2, double bc1, double bc2,
                      double eps, double lr, double keep, double scale) {
  const T tb1 = T(b1), tb2 = T(b2), ob1 = T(1.0 - b1), ob2 = T(1.0 - b2);
  const T tbc1 = T(bc1), tbc2 = T(bc2), te = T(eps), tlr = T(lr), tkeep = T(keep), ts = T(scale);
  const bool clip = scale != 1.0, decay = keep != 1.0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const T gi = clip ? g[i] * ts : g[i];
    const T mi = m[i] * tb1 + gi * ob1;
    const T vi = v[i] * tb2 + gi * gi * ob2;
    const T update = (mi / tbc1) / (sqrt(vi / tbc2) + te);
    const T wi = decay ? w[i] * tkeep : w[i];
    w[i] = wi - update * tlr;
    m[i] = mi;
    v[i] = vi;
  }
}

#define ADAMW_PARAMS                                                                                          \
  (T * w, const T* g, T* m, T* v, size_t n, double b1, double b2, double bc1, double bc2, double eps, double lr, \
   double keep, double scale)
#define ADAMW_ARGS (w, g, m, v, n, b1, b2, bc1, bc2, eps, lr, keep, scale)
RETORT_INSTANCE(adamw, f32, float, ADAMW_PARAMS, ADAMW_ARGS)
RETORT_INSTANCE(adamw, f64, double, ADAMW_PARAMS, ADAMW_ARGS)
