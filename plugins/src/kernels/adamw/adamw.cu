// The optimizer step on the GPU (see mod.rs for the formula), one launch per group of
// parameters: a table of device addresses in global memory, `table[k * count + t]` the k-th
// operand of tensor `t` (for `adamw`: w, g, m, v, then the element count; for `sum_squares`:
// x, then the element count); `blockIdx.y` picks the tensor, the x blocks stride over it.
#include "common.cuh"

using namespace retort;

// The AdamW update, in place, in the parameter's element type as on the CPU.
template <typename T>
__device__ void adamw(const uint64_t* table, unsigned count, double b1, double b2, double bc1, double bc2,
                      double eps, double lr, double keep, double scale) {
  const unsigned t = blockIdx.y;
  T* w = reinterpret_cast<T*>(table[t]);
  const T* g = reinterpret_cast<const T*>(table[count + t]);
  T* m = reinterpret_cast<T*>(table[2 * count + t]);
  T* v = reinterpret_cast<T*>(table[3 * count + t]);
  const size_t n = table[4 * count + t];
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

// Sums of squares for the gradient norm, in f64: block `(x, t)` writes the sum of its
// grid-stride share of tensor `t` to `out[t * gridDim.x + x]` (the host adds the blocks' sums in
// order, so the result does not depend on scheduling).
template <typename T> __device__ void sum_squares(const uint64_t* table, unsigned count, double* out) {
  __shared__ double scratch[32];
  const unsigned t = blockIdx.y;
  const T* x = reinterpret_cast<const T*>(table[t]);
  const size_t n = table[count + t];
  double acc = 0.0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const double xi = (double)load(x[i]);
    acc += xi * xi;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[(size_t)t * gridDim.x + blockIdx.x] = acc;
}

#define ADAMW_PARAMS                                                                                         \
  (const uint64_t* table, unsigned count, double b1, double b2, double bc1, double bc2, double eps, double lr, \
   double keep, double scale)
#define ADAMW_ARGS (table, count, b1, b2, bc1, bc2, eps, lr, keep, scale)
RETORT_INSTANCE(adamw, f32, float, ADAMW_PARAMS, ADAMW_ARGS)
RETORT_INSTANCE(adamw, f64, double, ADAMW_PARAMS, ADAMW_ARGS)

#define SUM_SQUARES_PARAMS (const uint64_t* table, unsigned count, double* out)
#define SUM_SQUARES_ARGS (table, count, out)
RETORT_FOR_DTYPES(sum_squares, SUM_SQUARES_PARAMS, SUM_SQUARES_ARGS)
