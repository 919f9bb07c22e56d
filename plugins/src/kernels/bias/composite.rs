//! The bias add composed of candle ops.

use candle_core::{Result, Tensor};

/// candle's `x.broadcast_add(bias)`.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.broadcast_add(bias)
}
