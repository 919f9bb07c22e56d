//! SwiGLU composed of candle ops.

use candle_core::{Result, Tensor};

/// candle's `silu(g)` times `u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    g.silu()? * u
}
