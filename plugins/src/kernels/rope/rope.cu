// Rotary position embedding on the GPU (see mod.rs for the formulas): one thread per pair in a
// grid-stride loop over the `rows * half` pairs of `x` `[B, H, T, d]` (`rows = B H T`,
// `half = d / 2`), tables `cos`, `sin` `[T, half]`. Pair `p` is pair `i = p mod half` of row
// `r = p / half`, at position `r mod T`; its elements are `(i, i + half)` of the row, or
// `(2i, 2i + 1)` when `interleaved`. `inverse` rotates by the negated angles (the backward).
// Math in f32 (f64 for f64); consecutive threads take consecutive pairs of a row.
#include "common.cuh"

using namespace retort;

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* out, uint64_t pairs, int half, int seq,
                     int interleaved, int inverse) {
  typedef typename Acc<T>::type A;
  const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
  for (uint64_t p = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const uint64_t r = p / (uint64_t)half;
    const int i = (int)(p - r * (uint64_t)half);
    const size_t k = (size_t)(r % (uint64_t)seq) * half + i;
    const size_t base = (size_t)r * (2 * (size_t)half);
    const size_t a = interleaved ? base + 2 * (size_t)i : base + i;
    const size_t b = interleaved ? a + 1 : a + half;
    const A c = load(cos[k]);
    const A s = inverse ? -load(sin[k]) : load(sin[k]);
    const A x0 = load(x[a]), x1 = load(x[b]);
    out[a] = store<T, A>(x0 * c - x1 * s);
    out[b] = store<T, A>(x0 * s + x1 * c);
  }
}

RETORT_FOR_DTYPES(rope,
                  (const T* x, const T* cos, const T* sin, T* out, uint64_t pairs, int half, int seq, int interleaved,
                   int inverse),
                  (x, cos, sin, out, pairs, half, seq, interleaved, inverse))
