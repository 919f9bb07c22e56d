// The parameter lists of the attention kernels: attention.cu's FMA kernels and the tensor-core
// ones (attention_mma.cu, attention_mma_bwd.cu) take the same arguments, so cuda.rs launches
// either with one list. `T` is the storage type, `AccT<T>` the row statistics' (`lse`, `delta`:
// f32; f64 for f64 storage); operands are strided `[B, H, T, d]` views (`*sb`, `*sh`, `*st`),
// gradients written at an offset through their own strides.
#pragma once
#include "common.cuh"

typedef unsigned long long u64;

template <typename T> using AccT = typename retort::Acc<T>::type;

#define ATTN_FWD_PARAMS                                                                                         \
  (const T* q, const T* k, const T* v, T* y, AccT<T>* lse, int heads, int kv_heads, int t, int d, double scale, \
   u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb, u64 vsh, u64 vst)
#define ATTN_FWD_ARGS (q, k, v, y, lse, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst)
#define ATTN_DQ_PARAMS                                                                                            \
  (const T* q, const T* k, const T* v, const T* dy, const AccT<T>* lse, const AccT<T>* delta, T* grad, int heads, \
   int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb,       \
   u64 vsh, u64 vst, u64 dq_off, u64 dqsb, u64 dqsh, u64 dqst)
#define ATTN_DQ_ARGS                                                                                         \
  (q, k, v, dy, lse, delta, grad, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, \
   dq_off, dqsb, dqsh, dqst)
#define ATTN_DKDV_PARAMS                                                                                          \
  (const T* q, const T* k, const T* v, const T* dy, const AccT<T>* lse, const AccT<T>* delta, T* grad, int heads, \
   int kv_heads, int t, int d, double scale, u64 qsb, u64 qsh, u64 qst, u64 ksb, u64 ksh, u64 kst, u64 vsb,       \
   u64 vsh, u64 vst, u64 dk_off, u64 dksb, u64 dksh, u64 dkst, u64 dv_off, u64 dvsb, u64 dvsh, u64 dvst)
#define ATTN_DKDV_ARGS                                                                                       \
  (q, k, v, dy, lse, delta, grad, heads, kv_heads, t, d, scale, qsb, qsh, qst, ksb, ksh, kst, vsb, vsh, vst, \
   dk_off, dksb, dksh, dkst, dv_off, dvsb, dvsh, dvst)
