//! GELU composed of candle ops.

use candle_core::{Result, Tensor};

/// candle's `gelu` (tanh approximation, differentiable).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}
