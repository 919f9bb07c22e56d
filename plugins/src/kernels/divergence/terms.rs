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

/// Forward skew KL(alpha), `m = alpha p_t + (1 - alpha) p_s`: `d_v = p_t (lt - ln m)`,
/// `a_v = p_s r_v`, `r_v = p_t / m`; `dD/da_u = -(1 - alpha) p_s,u (r_u - aux)`.
pub(super) struct SkewForward<T> {
    alpha: T,
    rest: T,
}

impl<T: Real> SkewForward<T> {
    pub(super) fn new(alpha: f64) -> Self {
        SkewForward {
            alpha: T::from_f64(alpha),
            rest: T::from_f64(1.0 - alpha),
        }
    }

    /// `(p_s, p_t, m)`.
    #[inline(always)]
    fn mix(&self, ls: T, lt: T) -> (T, T, T) {
        let (ps, pt) = (ls.exp(), lt.exp());
        (ps, pt, self.alpha * pt + self.rest * ps)
    }
}

impl<T: Real> Terms<T> for SkewForward<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (ps, pt, m) = self.mix(ls, lt);
        (pmul(pt, lt - m.ln()), pmul(ps, pt / m))
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (ps, pt, m) = self.mix(ls, lt);
        -(self.rest * pmul(ps, pt / m - aux))
    }
}

/// Reverse skew KL(alpha), `m = alpha p_s + (1 - alpha) p_t`: `d_v = p_s (ls - ln m)`,
/// `a_v = p_s k_v`, `k_v = ls - ln m - alpha p_s / m`; `dD/da_u = p_s,u (k_u - aux)`.
pub(super) struct SkewReverse<T> {
    alpha: T,
    rest: T,
}

impl<T: Real> SkewReverse<T> {
    pub(super) fn new(alpha: f64) -> Self {
        SkewReverse {
            alpha: T::from_f64(alpha),
            rest: T::from_f64(1.0 - alpha),
        }
    }

    /// `(p_s, ls - ln m, k)`.
    #[inline(always)]
    fn terms(&self, ls: T, lt: T) -> (T, T, T) {
        let (ps, pt) = (ls.exp(), lt.exp());
        let m = self.alpha * ps + self.rest * pt;
        let x = ls - m.ln();
        (ps, x, x - self.alpha * ps / m)
    }
}

impl<T: Real> Terms<T> for SkewReverse<T> {
    #[inline(always)]
    fn fwd(&self, ls: T, lt: T) -> (T, T) {
        let (ps, x, k) = self.terms(ls, lt);
        (pmul(ps, x), pmul(ps, k))
    }

    #[inline(always)]
    fn grad(&self, ls: T, lt: T, aux: T) -> T {
        let (ps, _, k) = self.terms(ls, lt);
        pmul(ps, k - aux)
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
