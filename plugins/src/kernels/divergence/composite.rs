//! The divergences composed of candle ops, from tempered log-probabilities (device-generic;
//! candle differentiates them). `ls`, `lt` are the student's and the teacher's
//! log-probabilities `[.., V]`; every divergence is per token, `[..]`.

use candle_core::{Result, Tensor, D};

use super::{check_shapes, Divergence};
use retort_core::ops::log_softmax;

/// Per-token divergence of student logits from teacher logits at temperature `t`, as the
/// fused [`super::per_token`] computes it (the teacher gets no gradient there; here it is the
/// caller's to detach).
pub fn per_token(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<Tensor> {
    check_shapes(student, teacher)?;
    let (ls, lt) = log_probs(student, teacher, t)?;
    from_log_probs(&ls, &lt, kind)
}

/// `(log softmax(z_s / t), log softmax(z_t / t))`, the teacher cast to the student's dtype.
pub fn log_probs(student: &Tensor, teacher: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
    let ls = log_softmax(&(student / t)?)?;
    let lt = log_softmax(&(teacher.to_dtype(ls.dtype())? / t)?)?;
    Ok((ls, lt))
}

/// The divergence `kind` from tempered log-probabilities.
pub fn from_log_probs(ls: &Tensor, lt: &Tensor, kind: Divergence) -> Result<Tensor> {
    match kind {
        Divergence::Forward => forward_kl(ls, lt),
        Divergence::Reverse => reverse_kl(ls, lt),
        Divergence::Jsd(beta) => jsd(ls, lt, beta),
        Divergence::SkewForward(alpha) => skew_kl(lt, ls, alpha),
        Divergence::SkewReverse(alpha) => skew_kl(ls, lt, alpha),
        Divergence::Tvd => tvd(ls, lt),
    }
}

/// `KL(a || b) = sum_v e^{la} (la - lb)`.
fn kl(la: &Tensor, lb: &Tensor) -> Result<Tensor> {
    (la.exp()? * (la - lb)?)?.sum(D::Minus1)
}

/// Forward KL `sum_v p_t (log p_t - log p_s)`.
pub fn forward_kl(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    kl(lt, ls)
}

/// Reverse KL `sum_v p_s (log p_s - log p_t)`.
pub fn reverse_kl(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    kl(ls, lt)
}

/// Generalized JSD `beta KL(p_t || m) + (1 - beta) KL(p_s || m)`, `m = beta p_t + (1 - beta) p_s`;
/// forward KL at `beta <= 0`, reverse KL at `beta >= 1` (as GKD).
pub fn jsd(ls: &Tensor, lt: &Tensor, beta: f64) -> Result<Tensor> {
    if beta <= 0.0 {
        return kl(lt, ls);
    }
    if beta >= 1.0 {
        return kl(ls, lt);
    }
    let lm = log_mix(lt, ls, beta)?;
    (kl(lt, &lm)? * beta)? + (kl(ls, &lm)? * (1.0 - beta))?
}

/// Skew KL `KL(p || alpha p + (1 - alpha) q)` from `lp = log p`, `lq = log q`; plain
/// `KL(p || q)` at `alpha <= 0` (DistiLLM's forward skew KL is `skew_kl(lt, ls, alpha)`, its
/// reverse `skew_kl(ls, lt, alpha)`).
pub fn skew_kl(lp: &Tensor, lq: &Tensor, alpha: f64) -> Result<Tensor> {
    if alpha > 0.0 {
        return kl(lp, &log_mix(lp, lq, alpha)?);
    }
    kl(lp, lq)
}

/// Total variation distance `0.5 sum_v |p_t - p_s|`.
pub fn tvd(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    (lt.exp()? - ls.exp()?)?.abs()?.sum(D::Minus1)? * 0.5
}

/// `log(w_a * exp(a) + (1 - w_a) * exp(b))` elementwise, stable for log-probabilities.
pub fn log_mix(a: &Tensor, b: &Tensor, w_a: f64) -> Result<Tensor> {
    let a = (a + w_a.ln())?;
    let b = (b + (1.0 - w_a).ln())?;
    // Any shift is exact; detaching it keeps the gradient path simple.
    let m = a.maximum(&b)?.detach();
    m.clone() + ((a - &m)?.exp()? + (b - &m)?.exp()?)?.log()?
}
