// The divergence op on the GPU (see mod.rs for the formulas): one block per row (token).
// Forward: one online sweep for both log-normalisers (and the cross sum of forward/reverse
// KL), a second sweep for the kinds whose sum needs both normalisers first (JSD, skew KL,
// TVD); writes (D, lse_a, lse_b, aux) per row in f32 (f64 for f64 logits).
// Backward: one sweep writing g * dD/dz_s in the logits' dtype. Math in f32 (f64), block
// reductions in a fixed order: the result does not depend on scheduling.
#include "common.cuh"

using namespace retort;

enum Kind { FORWARD = 0, REVERSE = 1, JSD = 2, SKEW_FORWARD = 3, SKEW_REVERSE = 4, TVD = 5 };

// `p * x`, 0 where `p == 0` (the limit at a `-inf` logit), NaN where `p` is NaN.
template <typename A> __device__ __forceinline__ A pmul0(A p, A x) { return p == A(0) ? A(0) : p * x; }

// The skew mixture relative to its own side `p` (log-prob `l`; the other side `lo`):
// `w = (1 - alpha) p_o / p` (the ratio capped at 1e30), `q = m / p = alpha + w`. The skew KLs
// take `ln(m / p) = ln q` rather than `ln m - ln p`, which loses f32 digits (as on the CPU).
template <typename A> struct Skew {
  A p, po, w, q;
};
template <typename A> __device__ __forceinline__ Skew<A> skew(A alpha, A l, A lo) {
  Skew<A> k;
  k.p = exp_(l);
  k.po = exp_(lo);
  const A ratio = k.po / k.p;
  k.w = (A(1) - alpha) * (ratio > A(1e30) ? A(1e30) : ratio);
  k.q = alpha + k.w;
  return k;
}

// The second sweep's per-element terms: adds to `d` and `aux` (see mod.rs and terms.rs: the
// same evaluation as the CPU rows).
template <typename A>
__device__ __forceinline__ void second_terms(int kind, A param, A ls, A lt, A& d, A& aux) {
  if (kind == JSD) {
    const A ps = exp_(ls), pt = exp_(lt);
    const A bt = param, bs = A(1) - param;
    const A lm = log_(bt * pt + bs * ps);
    const A gs = bs * pmul(ps, ls - lm);
    d += bt * pmul(pt, lt - lm) + gs;
    aux += gs;
  } else if (kind == SKEW_FORWARD) {  // d = p_t (lt - ln m), a = p_s p_t / m
    const Skew<A> k = skew(param, lt, ls);
    d += pmul0(k.p, -log_(k.q));
    aux += pmul0(k.po, A(1) / k.q);
  } else if (kind == SKEW_REVERSE) {  // d = p_s (ls - ln m), a = p_s (ls - ln m + (1 - alpha) p_t / m)
    const Skew<A> k = skew(param, ls, lt);
    const A x = -log_(k.q);
    d += pmul0(k.p, x);
    aux += pmul0(k.p, x + k.w / k.q);
  } else {  // TVD
    const A ps = exp_(ls), pt = exp_(lt);
    const A diff = pt - ps;
    d += A(0.5) * (diff >= A(0) ? diff : -diff);
    aux += ps * (diff >= A(0) ? A(-1) : A(1));
  }
}

template <typename T>
__device__ void divergence_fwd(const T* zs, const T* zt, typename Acc<T>::type* out, int v, int kind,
                               double inv_t, double param) {
  typedef typename Acc<T>::type A;
  __shared__ Online<A> scratch_o[32];
  __shared__ A scratch[32];
  const size_t row = blockIdx.x;
  const T* s = zs + row * (size_t)v;
  const T* t = zt + row * (size_t)v;
  const A it = A(inv_t), pa = A(param);
  Online<A> oa = online_empty<A>(), ob = online_empty<A>();
  const auto read = [&](int i) { return Pair<A>{load(s[i]) * it, load(t[i]) * it}; };
  sweep<UNROLL>(v, read, [&](int, Pair<A> x) {
    // The companion sums of forward/reverse KL: sum e^{b - mb} (b - a), sum e^{a - ma} (a - b).
    online_push(oa, x.a, kind == REVERSE ? x.a - x.b : A(0));
    online_push(ob, x.b, kind == FORWARD ? x.b - x.a : A(0));
  });
  oa = block_merge(oa, scratch_o);
  ob = block_merge(ob, scratch_o);
  const A lse_a = online_lse(oa), lse_b = online_lse(ob);
  A d = A(0), aux = A(0);
  if (kind == FORWARD) {
    d = ob.x / ob.s - lse_b + lse_a;  // sum p_t (b - a) - lse_b + lse_a
  } else if (kind == REVERSE) {
    d = oa.x / oa.s - lse_a + lse_b;
  } else {
    sweep<UNROLL>(v, read, [&](int, Pair<A> x) { second_terms(kind, pa, x.a - lse_a, x.b - lse_b, d, aux); });
    d = block_sum(d, scratch);
    aux = block_sum(aux, scratch);
  }
  if (threadIdx.x == 0) {
    A* o = out + row * 4;
    o[0] = d;
    o[1] = lse_a;
    o[2] = lse_b;
    o[3] = aux;
  }
}

// dD/da_u / (the row's incoming gradient) for one element (see mod.rs).
template <typename A>
__device__ __forceinline__ A grad_term(int kind, A param, A ls, A lt, A d, A aux) {
  switch (kind) {
    case FORWARD:
      return exp_(ls) - exp_(lt);
    case REVERSE: {
      const A ps = exp_(ls);
      return pmul(ps, ls - lt - d);
    }
    case JSD: {
      const A ps = exp_(ls), pt = exp_(lt), bs = A(1) - param;
      return pmul(ps, bs * (ls - log_(param * pt + bs * ps)) - aux);
    }
    case SKEW_FORWARD: {
      const Skew<A> k = skew(param, lt, ls);
      return -((A(1) - param) * pmul0(k.po, A(1) / k.q - aux));
    }
    case SKEW_REVERSE: {
      const Skew<A> k = skew(param, ls, lt);
      return pmul0(k.p, -log_(k.q) + k.w / k.q - aux);
    }
    default: {  // TVD
      const A ps = exp_(ls), pt = exp_(lt);
      return A(0.5) * ps * ((pt - ps >= A(0) ? A(-1) : A(1)) - aux);
    }
  }
}

// `stats` per row: (D, lse_a, lse_b, aux, g).
template <typename T>
__device__ void divergence_bwd(const T* zs, const T* zt, const typename Acc<T>::type* stats, T* grad, int v,
                               int kind, double inv_t, double param) {
  typedef typename Acc<T>::type A;
  const size_t row = blockIdx.x;
  const A* st = stats + row * 5;
  const A d = st[0], lse_a = st[1], lse_b = st[2], aux = st[3], g = st[4];
  const A it = A(inv_t), gi = g * it, pa = A(param);
  const T* s = zs + row * (size_t)v;
  const T* t = zt + row * (size_t)v;
  T* o = grad + row * (size_t)v;
  if (g == A(0)) {  // a masked row: no gradient, and no work
    for (int i = threadIdx.x; i < v; i += blockDim.x) o[i] = store<T, A>(A(0));
    return;
  }
  const auto read = [&](int i) { return Pair<A>{load(s[i]) * it - lse_a, load(t[i]) * it - lse_b}; };
  sweep<UNROLL>(v, read, [&](int i, Pair<A> x) { o[i] = store<T, A>(gi * grad_term(kind, pa, x.a, x.b, d, aux)); });
}

RETORT_FOR_DTYPES(divergence_fwd,
                  (const T* zs, const T* zt, Acc<T>::type* out, int v, int kind, double inv_t, double param),
                  (zs, zt, out, v, kind, inv_t, param))
RETORT_FOR_DTYPES(divergence_bwd,
                  (const T* zs, const T* zt, const Acc<T>::type* stats, T* grad, int v, int kind, double inv_t,
                   double param),
                  (zs, zt, stats, grad, v, kind, inv_t, param))
