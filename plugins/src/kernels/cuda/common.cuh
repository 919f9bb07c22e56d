// What retort's CUDA kernels share: element conversions (f32/f64 math for every storage
// dtype), warp and block reductions in a fixed order (deterministic: no atomics), and the
// online (single-sweep) log-sum-exp state.
#pragma once
#ifdef RETORT_EMULATE
#include "emulate.h"  // the same kernels on the CPU, for tests (feature `cuda-emulate`)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#endif

namespace retort {

// ---- element conversions: compute in float (double for f64 storage) ----

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

template <typename T, typename A> __device__ __forceinline__ T store(A x);
template <> __device__ __forceinline__ float store<float, float>(float x) { return x; }
template <> __device__ __forceinline__ double store<double, double>(double x) { return x; }
template <> __device__ __forceinline__ __half store<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float max_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_(double a, double b) { return fmax(a, b); }

template <typename A> __device__ __forceinline__ A neg_inf() { return -INFINITY; }

// `p * x`, 0 where `p == 0` (so `0 * -inf` is 0, the limit of `p ln p`).
template <typename A> __device__ __forceinline__ A pmul(A p, A x) { return p > A(0) ? p * x : A(0); }

// ---- the row sweep ----

// Visits `i = threadIdx.x, + blockDim.x, ... < n` in ascending order, reading `U` elements
// (`read(i)`) before using any (`use(i, x)`), so that each thread keeps `U` loads in flight:
// one row per block is memory-bound, and latency is hidden by loads in flight.
template <int U, typename Read, typename Use>
__device__ __forceinline__ void sweep(int n, Read read, Use use) {
  const int step = blockDim.x;
  int i = threadIdx.x;
  for (; i + (U - 1) * step < n; i += U * step) {
    decltype(read(0)) x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = read(i + u * step);
#pragma unroll
    for (int u = 0; u < U; ++u) use(i + u * step, x[u]);
  }
  for (; i < n; i += step) use(i, read(i));
}

// Loads in flight per thread in the row sweeps.
constexpr int UNROLL = 4;

template <typename A> struct Pair {
  A a, b;
};

// ---- reductions ----

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sum of `v` over the block, returned to every thread. `scratch` holds 32 values; the
// leading barrier lets one scratch serve consecutive reductions.
template <typename A> __device__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : A(0);
  return warp_sum(v);
}

// Online log-sum-exp of a stream of values: `m` the running maximum, `s = sum e^{x - m}`,
// `x` a companion sum rescaled with `s` (e.g. `sum e^{x_i - m} y_i`).
template <typename A> struct Online {
  A m, s, x;
};

template <typename A> __device__ __forceinline__ Online<A> online_empty() {
  Online<A> o;
  o.m = neg_inf<A>();
  o.s = A(0);
  o.x = A(0);
  return o;
}

// Adds value `v` with companion `y` (the companion counts only where `e^{v - m} > 0`).
template <typename A> __device__ __forceinline__ void online_push(Online<A>& o, A v, A y) {
  if (v == neg_inf<A>()) return;
  if (v > o.m) {
    const A scale = exp_(o.m - v);  // 0 while o is empty
    o.s = o.s * scale + A(1);
    o.x = o.x * scale + y;
    o.m = v;
  } else {
    const A e = exp_(v - o.m);
    o.s += e;
    o.x += pmul(e, y);
  }
}

template <typename A> __device__ __forceinline__ Online<A> online_merge(Online<A> a, Online<A> b) {
  if (a.m == neg_inf<A>()) return b;
  if (b.m == neg_inf<A>()) return a;
  const A m = max_(a.m, b.m);
  const A ea = exp_(a.m - m), eb = exp_(b.m - m);
  Online<A> o;
  o.m = m;
  o.s = a.s * ea + b.s * eb;
  o.x = a.x * ea + b.x * eb;
  return o;
}

template <typename A> __device__ __forceinline__ Online<A> warp_merge(Online<A> o) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    Online<A> other;
    other.m = __shfl_xor_sync(0xffffffffu, o.m, d);
    other.s = __shfl_xor_sync(0xffffffffu, o.s, d);
    other.x = __shfl_xor_sync(0xffffffffu, o.x, d);
    o = online_merge(o, other);
  }
  return o;
}

// The merged online state of the block, returned to every thread. `scratch` holds 32 states.
template <typename A> __device__ Online<A> block_merge(Online<A> o, Online<A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  o = warp_merge(o);
  __syncthreads();
  if (lane == 0) scratch[warp] = o;
  __syncthreads();
  o = lane < warps ? scratch[lane] : online_empty<A>();
  return warp_merge(o);
}

// `m + ln s`: the log-sum-exp of an online state (-inf when empty).
template <typename A> __device__ __forceinline__ A online_lse(const Online<A>& o) {
  return o.m == neg_inf<A>() ? neg_inf<A>() : o.m + log_(o.s);
}


// ---- sums over rows, per column (deterministic: fixed slices, summed in order) ----

// One block of `blockDim.x` consecutive columns (`blockIdx.x`) of one slice of `slice_rows`
// rows (`blockIdx.y`): `partials[(slice * K + k) * d + j] = sum_{r in slice} t_k(r, j)`, the
// rows in ascending order, where `term(r, j, acc)` adds row `r`'s K terms at column `j` to
// `acc[0..K]`.
template <int K, typename A, typename Term>
__device__ __forceinline__ void column_partials(int rows, int d, int slice_rows, A* partials, Term term) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
  const size_t slice = blockIdx.y;
  const int first = (int)slice * slice_rows;
  const int last = first + slice_rows < rows ? first + slice_rows : rows;
  A acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = A(0);
  for (int r = first; r < last; ++r) term(r, j, acc);
#pragma unroll
  for (int k = 0; k < K; ++k) partials[(slice * K + k) * (size_t)d + j] = acc[k];
}

// `out[k * d + j] = sum_s partials[(s * K + k) * d + j]` over `slices` in ascending order (0
// where there are none), one thread per column.
template <int K, typename T, typename A>
__device__ __forceinline__ void column_finish(const A* partials, int slices, int d, T* out) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    A s = A(0);
    for (int t = 0; t < slices; ++t) s += partials[((size_t)t * K + k) * d + j];
    out[(size_t)k * d + j] = store<T, A>(s);
  }
}

// Visits every element index `i < n` of a grid-stride loop over the whole grid (x).
template <typename F> __device__ __forceinline__ void each_element(unsigned long long n, F f) {
  const unsigned long long step = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) f((size_t)i);
}

}  // namespace retort

// A kernel's entry in the emulation's registry (by name, for the Rust side's launch); nothing on
// the GPU. Kernel names are unique across all `.cu` files.
#ifdef RETORT_EMULATE
#define RETORT_REGISTER(NAME) RETORT_EMULATE_REGISTER(NAME)
#else
#define RETORT_REGISTER(NAME)
#endif

// Dynamic shared memory (the launch's `shared_mem_bytes`) as an array `NAME` of `TYPE`.
#ifdef RETORT_EMULATE
#define RETORT_DYNAMIC_SHARED(TYPE, NAME) TYPE* NAME = static_cast<TYPE*>(::retort_emu::dynamic_shared())
#else
#define RETORT_DYNAMIC_SHARED(TYPE, NAME) extern __shared__ TYPE NAME[]
#endif

// Instantiates the extern "C" kernels `NAME_f32`, `_f64`, `_f16`, `_bf16` of the device template
// `NAME<T>`: `PARAMS` is the parameter list (it may name the element type `T`), `ARGS` the
// call's argument list.
#define RETORT_INSTANCE(NAME, SUFFIX, TYPE, PARAMS, ARGS)             \
  namespace retort_##SUFFIX {                                         \
  typedef TYPE T;                                                     \
  extern "C" __global__ void NAME##_##SUFFIX PARAMS { NAME<T> ARGS; } \
  RETORT_REGISTER(NAME##_##SUFFIX)                                    \
  }
#define RETORT_FOR_DTYPES(NAME, PARAMS, ARGS)                \
  RETORT_INSTANCE(NAME, f32, float, PARAMS, ARGS)            \
  RETORT_INSTANCE(NAME, f64, double, PARAMS, ARGS)           \
  RETORT_INSTANCE(NAME, f16, __half, PARAMS, ARGS)           \
  RETORT_INSTANCE(NAME, bf16, __nv_bfloat16, PARAMS, ARGS)
