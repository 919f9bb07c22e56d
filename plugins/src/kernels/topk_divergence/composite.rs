//! The top-k KL composed of candle ops (device-generic; candle differentiates it).

use candle_core::{Result, Tensor, D};

use super::{TopkTail, EPS};
use retort_core::ops::log_softmax;

/// Per-token top-k KL as the fused [`super::per_token`] takes it: student logits `[.., V]`,
/// teacher `ids` and log-probs `lpt` `[.., k]` (temperature 1) whose `-inf` entries are skipped.
pub fn per_token(student: &Tensor, ids: &Tensor, lpt: &Tensor, tail: TopkTail, t: f64) -> Result<Tensor> {
    let lpt = lpt.detach().to_dtype(student.dtype())?;
    let kept = lpt.gt(f64::NEG_INFINITY)?;
    let valid = kept.to_dtype(lpt.dtype())?;
    let lpt = kept.where_cond(&lpt, &lpt.zeros_like()?)?;
    let ls_full = log_softmax(&(student / t)?)?;
    from_log_probs(&ls_full, ids, &lpt, Some(&valid), tail, t)
}

/// Per-token top-k KL from the student's full log-probs `ls_full` `[.., V]` (already tempered)
/// and the teacher's sparse `ids`, `lpt` `[.., n]`; `valid` (1/0, `[.., n]`) drops entries
/// (duplicates in a union of id sets).
///
/// - bucket: `L = sum_{v in S} p_t (log p_t - log p_s) + m_t (log m_t - log m_s)`,
///   `m = 1 - sum_{v in S} p` (clamped at 1e-12);
/// - renormalize: `L = KL(softmax_S(log p_t / T) || softmax_S(log p_s))`.
pub fn from_log_probs(
    ls_full: &Tensor,
    ids: &Tensor,
    lpt: &Tensor,
    valid: Option<&Tensor>,
    tail: TopkTail,
    t: f64,
) -> Result<Tensor> {
    let ls = ls_full.contiguous()?.gather(&ids.contiguous()?, D::Minus1)?;
    let lpt = lpt.to_dtype(ls.dtype())?;
    let m = valid.map(|v| v.to_dtype(ls.dtype())).transpose()?;
    let keep = |x: Tensor| -> Result<Tensor> {
        Ok(match &m {
            Some(m) => (x * m)?,
            None => x,
        })
    };
    // Invalid entries pushed to a finite -1e9 (not -inf, which would give 0 * inf = NaN).
    let drop = |x: Tensor| -> Result<Tensor> {
        Ok(match &m {
            Some(m) => (x + (m.affine(1.0, -1.0)? * 1e9)?)?,
            None => x,
        })
    };
    match tail {
        TopkTail::Renormalize => {
            let lt = log_softmax(&drop((lpt / t)?)?)?;
            let ls_hat = log_softmax(&drop(ls)?)?;
            keep((lt.exp()? * (&lt - ls_hat)?)?)?.sum(D::Minus1)
        }
        TopkTail::Bucket => {
            let pt = keep(lpt.exp()?)?;
            let head = (&pt * (&lpt - &ls)?)?.sum(D::Minus1)?;
            let mt = pt.sum(D::Minus1)?.affine(-1.0, 1.0)?.maximum(EPS)?;
            let ms = keep(ls.exp()?)?.sum(D::Minus1)?.affine(-1.0, 1.0)?.maximum(EPS)?;
            head + (&mt * (mt.log()? - ms.log()?)?)?
        }
    }
}
