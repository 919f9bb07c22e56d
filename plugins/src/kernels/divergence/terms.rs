//! The element terms of the divergences whose forward sums an `aux` in a second sweep (JSD,
//! skew KL, TVD), for the generic CPU rows of `cpu.rs`: from the tempered log-probabilities
//! `ls`, `lt` of one vocabulary entry, its share `d_v` of `D` and `a_v` of `aux`, and its
//! gradient `dD/da_u` given the row's `aux` (formulas in `mod.rs`).
//!
//! Each method is `#[inline(always)]`: the row loops call them per element and only vectorise
//! when the `exp`/`ln` inside are inlined into the loop (a closure would not be).

use crate::kernels::cpu::fastmath::Real;

/// `p * x`, 0 where `p == 0` (so `0 * -inf` is 0, the limit of `p ln p`).
#[inline(always)]
pub(super) fn pmul<T: Real>(p: T, x: T) -> T {
    if p > T::ZERO {
        p * x
    } else {
        T::ZERO
    }
}

/// `p * x`, 0 where `p == 0` (the limit at a `-inf` logit, whatever `x` is there); unlike
/// [`pmul`] a NaN `p` stays NaN, so that a NaN logit, which makes every `p` of its row NaN,
/// gives a NaN divergence (the skew KLs' only NaN path on that side).
#[inline(always)]
fn pmul0<T: Real>(p: T, x: T) -> T {
    if p == T::ZERO {
        T::ZERO
    } else {
        p * x
    }
}

/// One divergence's element terms: `D = sum_v d_v`, `aux = sum_v a_v`.
pub(super) trait Terms<T: Real> {
    /// `(d_v, a_v)` of the entry with log-probabilities `ls`, `lt`.
    fn fwd(&self, ls: T, lt: T) -> (T, T);
    /// `dD/da_u` of the entry, given the row's `aux`.
    fn grad(&self, ls: T, lt: T, aux: T) -> T;
}

/// Generalized JSD(beta): `d_v = beta p_t (lt - lm) + (1 - beta) p_s (ls - lm)`,
/// `a_v = p_s g_v`, `g_v = (1 - beta)(ls - lm)`, `lm = ln(beta p_t + (1 - beta) p_s)`;
/// `dD/da_u = p_s,u (g_u - aux)`.
pub(super) struct Jsd<T> {
    bt: T,
    bs: T,
}

impl<T: Real> Jsd<T> {
    pub(super) fn new(beta: f64) -> Self {
        Jsd {
            bt: T::from_f64(beta),
            bs: T::from_f64(1.0 - beta),
        }
    }

    /// `(p_s, p_t, lm)`.
    #[inline(always)]
    fn mix(&self, ls: T, lt: T) -> (T, T, T) {
        let (ps, pt) = (ls.exp(), lt.exp());
        (ps, pt, (self.bt * pt + self.bs * ps).ln())
    }
}

impl<T: Real> Terms<T> for Jsd<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (ps, pt, lm) = self.mix(ls, lt);
        let gs = self.bs * pmul(ps, ls - lm);
        (self.bt * pmul(pt, lt - lm) + gs, gs)
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (ps, _, lm) = self.mix(ls, lt);
        pmul(ps, self.bs * (ls - lm) - aux)
    }
}

/// A skew mixture `m = alpha p + (1 - alpha) p_o` relative to its own side `p`:
/// `q = m / p = alpha + (1 - alpha) p_o / p`. The skew KLs take `ln(m / p) = ln q`, the log of a
/// number in `[alpha, ..)`, instead of `ln m - ln p`: with `|ln m|` up to ~10, the difference
/// of two logarithms loses f32 digits to the ~1e-7 relative error of each. The ratio is capped
/// at `1e30`, so that a subnormal `p` (f64) cannot make it infinite; where the cap applies,
/// `p < 1e-30` and the entry's terms, all multiplied by `p`, are below ~1e-27.
struct Skew<T> {
    alpha: T,
    rest: T,
}

impl<T: Real> Skew<T> {
    fn new(alpha: f64) -> Self {
        Skew {
            alpha: T::from_f64(alpha),
            rest: T::from_f64(1.0 - alpha),
        }
    }

    /// `(p, p_o, w, q)` with `w = (1 - alpha) p_o / p`, `q = alpha + w`, from the
    /// log-probabilities `l` of the skewed side and `lo` of the other.
    #[inline(always)]
    fn q(&self, l: T, lo: T) -> (T, T, T, T) {
        let (p, po) = (l.exp(), lo.exp());
        let ratio = po / p;
        let cap = T::from_f64(1e30);
        let w = self.rest * if ratio > cap { cap } else { ratio };
        (p, po, w, self.alpha + w)
    }
}

/// Forward skew KL(alpha), `m = alpha p_t + (1 - alpha) p_s`: `d_v = p_t (lt - ln m)`,
/// `a_v = p_s r_v`, `r_v = p_t / m`; `dD/da_u = -(1 - alpha) p_s,u (r_u - aux)`. Evaluated as
/// `lt - ln m = -ln q`, `r = 1 / q` with `q = m / p_t` ([`Skew`]).
pub(super) struct SkewForward<T>(Skew<T>);

impl<T: Real> SkewForward<T> {
    pub(super) fn new(alpha: f64) -> Self {
        SkewForward(Skew::new(alpha))
    }
}

impl<T: Real> Terms<T> for SkewForward<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (pt, ps, _, q) = self.0.q(lt, ls);
        (pmul0(pt, -q.ln()), pmul0(ps, T::ONE / q))
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (_, ps, _, q) = self.0.q(lt, ls);
        -(self.0.rest * pmul0(ps, T::ONE / q - aux))
    }
}

/// Reverse skew KL(alpha), `m = alpha p_s + (1 - alpha) p_t`: `d_v = p_s (ls - ln m)`,
/// `a_v = p_s k_v`, `k_v = dD/dp_s,v = ls - ln m + (1 - alpha) p_t / m`;
/// `dD/da_u = p_s,u (k_u - aux)`. Evaluated as `ls - ln m = -ln q`,
/// `(1 - alpha) p_t / m = w / q` with `q = m / p_s` ([`Skew`]). (`k_v` written as
/// `ls - ln m + 1 - alpha p_s / m` holds a constant 1 that cancels in `k_u - aux` only after
/// both are rounded near -1: in f32 that cost 10x in the gradient at `alpha = 0.9`.)
pub(super) struct SkewReverse<T>(Skew<T>);

impl<T: Real> SkewReverse<T> {
    pub(super) fn new(alpha: f64) -> Self {
        SkewReverse(Skew::new(alpha))
    }

    /// `(p_s, ls - ln m, k)`.
    #[inline(always)]
    fn terms(&self, ls: T, lt: T) -> (T, T, T) {
        let (ps, _, w, q) = self.0.q(ls, lt);
        let x = -q.ln();
        (ps, x, x + w / q)
    }
}

impl<T: Real> Terms<T> for SkewReverse<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (ps, x, k) = self.terms(ls, lt);
        (pmul0(ps, x), pmul0(ps, k))
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (ps, _, k) = self.terms(ls, lt);
        pmul0(ps, k - aux)
    }
}

/// Total variation: `d_v = 0.5 |p_t - p_s|`, `a_v = p_s sigma_v`, `sigma_v = -1` where
/// `p_t >= p_s`, else `+1`; `dD/da_u = 0.5 p_s,u (sigma_u - aux)`.
pub(super) struct Tvd<T> {
    half: T,
}

impl<T: Real> Tvd<T> {
    pub(super) fn new() -> Self {
        Tvd { half: T::from_f64(0.5) }
    }

    /// `(p_s, |p_t - p_s|, sigma)`; NaN gives a NaN distance.
    #[inline(always)]
    fn terms(ls: T, lt: T) -> (T, T, T) {
        let (ps, pt) = (ls.exp(), lt.exp());
        let diff = pt - ps;
        if diff >= T::ZERO {
            (ps, diff, -T::ONE)
        } else {
            (ps, -diff, T::ONE)
        }
    }
}

impl<T: Real> Terms<T> for Tvd<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (ps, dist, sigma) = Self::terms(ls, lt);
        (self.half * dist, ps * sigma)
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (ps, _, sigma) = Self::terms(ls, lt);
        self.half * ps * (sigma - aux)
    }
}
