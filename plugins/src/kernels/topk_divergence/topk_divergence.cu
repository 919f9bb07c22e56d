// The top-k KL on the GPU (see mod.rs for the formulas): one block per row (token).
// Bucket: one online sweep of the full row for the student's log-normaliser, then the k teacher
// entries; renormalize: the k entries only. Writes (D, lse, c1, c2) per row in f32 (f64 for
// f64 logits). The backward writes the dense row (bucket) or zeros (renormalize), then one
// thread applies the k sparse entries in order (ids may repeat; no atomics).
#include "common.cuh"

using namespace retort;

enum Tail { BUCKET = 0, RENORMALIZE = 1 };

template <typename A> __device__ __forceinline__ bool valid(A lp) { return lp > neg_inf<A>(); }

// (head, P_t, P_s) of the bucket tail over the k entries, given the student's lse.
template <typename T, typename A>
__device__ void bucket_sums(const T* z, const uint32_t* ids, const A* lpt, int k, int v, A it, A lse, A* scratch,
                            A& head, A& pt_sum, A& ps_sum) {
  head = A(0), pt_sum = A(0), ps_sum = A(0);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const A lp = lpt[j];
    const uint32_t id = ids[j];
    if (!valid(lp)) continue;
    // An id outside the vocabulary poisons the row (NaN): ids are checked where they are made.
    const A ls = id < (uint32_t)v ? load(z[id]) * it - lse : A(NAN);
    const A pt = exp_(lp);
    head += pmul(pt, lp - ls);
    pt_sum += pt;
    ps_sum += exp_(ls);
  }
  head = block_sum(head, scratch);
  pt_sum = block_sum(pt_sum, scratch);
  ps_sum = block_sum(ps_sum, scratch);
}

template <typename T>
__device__ void topk_fwd(const T* zs, const uint32_t* ids_, const typename Acc<T>::type* lpt_,
                         typename Acc<T>::type* out, int v, int k, int tail, double inv_t, double eps) {
  typedef typename Acc<T>::type A;
  __shared__ Online<A> scratch_o[32];
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* z = zs + row * (size_t)v;
  const uint32_t* ids = ids_ + row * (size_t)k;
  const A* lpt = lpt_ + row * (size_t)k;
  const A it = A(inv_t);
  A d, c0, c1, c2;
  if (tail == BUCKET) {
    Online<A> o = online_empty<A>();
    sweep<UNROLL>(v, [&](int i) { return load(z[i]) * it; }, [&](int, A a) { online_push(o, a, A(0)); });
    const A lse = online_lse(block_merge(o, scratch_o));
    A head, pt_sum, ps_sum;
    bucket_sums(z, ids, lpt, k, v, it, lse, scratch, head, pt_sum, ps_sum);
    const A mt = max_(A(1) - pt_sum, A(eps));
    const A ms_raw = A(1) - ps_sum;
    const A ms = max_(ms_raw, A(eps));
    const A c = ms_raw >= A(eps) ? -mt / ms : A(0);
    d = head + mt * (log_(mt) - log_(ms));
    c0 = lse, c1 = pt_sum + c * ps_sum, c2 = c;
  } else {
    Online<A> os = online_empty<A>(), ot = online_empty<A>();
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      const A lp = lpt[j];
      if (!valid(lp)) continue;
      const uint32_t id = ids[j];
      online_push(os, id < (uint32_t)v ? load(z[id]) * it : A(NAN), A(0));
      online_push(ot, lp * it, A(0));
    }
    const A lse_s = online_lse(block_merge(os, scratch_o));
    const A lse_t = online_lse(block_merge(ot, scratch_o));
    A sum = A(0);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
      const A lp = lpt[j];
      if (!valid(lp)) continue;
      const A lt = lp * it - lse_t;
      sum += pmul(exp_(lt), lt - (load(z[ids[j]]) * it - lse_s));
    }
    sum = block_sum(sum, scratch);
    d = ot.m == neg_inf<A>() ? A(0) : sum;  // no valid entry: no divergence
    c0 = lse_s, c1 = lse_t, c2 = A(0);
  }
  if (threadIdx.x == 0) {
    A* o = out + row * 4;
    o[0] = d, o[1] = c0, o[2] = c1, o[3] = c2;
  }
}

// `packed` per row: k teacher log-probs, then (D, lse, c1, c2, g).
template <typename T>
__device__ void topk_bwd(const T* zs, const uint32_t* ids_, const typename Acc<T>::type* packed, T* grad, int v,
                         int k, int tail, double inv_t) {
  typedef typename Acc<T>::type A;
  const size_t row = blockIdx.x;
  const T* z = zs + row * (size_t)v;
  const uint32_t* ids = ids_ + row * (size_t)k;
  const A* lpt = packed + row * (size_t)(k + 5);
  const A* st = lpt + k;
  const A it = A(inv_t), g = st[4] * it;
  T* o = grad + row * (size_t)v;
  const A lse = st[1], k1 = st[2], c = st[3];
  const bool dense = tail == BUCKET && g != A(0);
  if (dense) {
    const A gk = g * k1;
    sweep<UNROLL>(v, [&](int i) { return load(z[i]); }, [&](int i, A x) { o[i] = store<T, A>(gk * exp_(x * it - lse)); });
  } else {
    for (int i = threadIdx.x; i < v; i += blockDim.x) o[i] = store<T, A>(A(0));
  }
  __syncthreads();
  if (threadIdx.x != 0 || g == A(0)) return;
  for (int j = 0; j < k; ++j) {
    const A lp = lpt[j];
    const uint32_t id = ids[j];
    if (!valid(lp) || id >= (uint32_t)v) continue;
    const A a = load(z[id]) * it;
    const A delta = tail == BUCKET ? -g * (exp_(lp) + c * exp_(a - lse))
                                   : g * (exp_(a - lse) - exp_(lp * it - st[2]));
    o[id] = store<T, A>(load(o[id]) + delta);
  }
}

RETORT_FOR_DTYPES(topk_fwd,
                  (const T* zs, const uint32_t* ids, const Acc<T>::type* lpt, Acc<T>::type* out, int v, int k,
                   int tail, double inv_t, double eps),
                  (zs, ids, lpt, out, v, k, tail, inv_t, eps))
RETORT_FOR_DTYPES(topk_bwd,
                  (const T* zs, const uint32_t* ids, const Acc<T>::type* packed, T* grad, int v, int k, int tail,
                   double inv_t),
                  (zs, ids, packed, grad, v, k, tail, inv_t))
