//! RMSNorm composed of candle ops.

use candle_core::{Result, Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dim, of differentiable candle ops.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}
