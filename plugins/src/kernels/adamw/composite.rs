//! The AdamW update composed of candle ops.

use candle_core::{Result, Tensor};

use super::AdamWStep;

/// `(w', m', v')` of one AdamW step of candle ops, op for op as the host's optimizer writes it.
pub fn update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    let g = if s.grad_scale != 1.0 {
        (g * s.grad_scale)?
    } else {
        g.clone()
    };
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let denom = ((&v / s.bias_correction2)?.sqrt()? + s.eps)?;
    let update = ((&m / s.bias_correction1)? / denom)?;
    let w = if s.weight_decay > 0.0 {
        (w * (1.0 - s.lr * s.weight_decay))?
    } else {
        w.clone()
    };
    Ok(((w - (update * s.lr)?)?, m, v))
}
