//! Cross-entropy composed of candle ops.

use candle_core::{Result, Tensor, D};

use retort_core::ops::log_softmax;

/// Per-token `(1 - eps) (-log p(y)) + eps mean_v(-log p(v))` of `logits` `[.., V]` against
/// `targets` `[..]`, `p = softmax(logits)`, of candle ops: `[..]`.
pub fn per_token(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = logits.dims();
    let (lead, v) = dims.split_at(dims.len().saturating_sub(1));
    let rows: usize = lead.iter().product();
    let logp = log_softmax(&logits.reshape((rows, v.iter().product::<usize>()))?)?;
    let nll = logp.gather(&targets.reshape((rows, 1))?, 1)?.neg()?;
    let per_token = if eps > 0.0 {
        let smooth = logp.mean(D::Minus1)?.neg()?.reshape((rows, 1))?;
        ((nll * (1.0 - eps))? + (smooth * eps)?)?
    } else {
        nll
    };
    per_token.reshape(lead)
}
