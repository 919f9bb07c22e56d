//! RoPE composed of candle ops (differentiable by candle): the pairs cut out with `narrow`,
//! rotated with broadcast products, and put back with `cat` (half-split) or `stack`
//! (interleaved).

use candle_core::{Result, Tensor, D};

/// Rotates `x` `[B, H, T, d]` by `cos`, `sin` `[T, d/2]`: pair `(x0, x1)` becomes
/// `(x0 cos - x1 sin, x0 sin + x1 cos)`, pairs `(i, i + d/2)`, or `(2i, 2i + 1)` when
/// `interleaved`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    let rotate = |x0: &Tensor, x1: &Tensor| -> Result<(Tensor, Tensor)> {
        let r0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
        let r1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
        Ok((r0, r1))
    };
    if interleaved {
        let pairs = x.reshape((b, h, t, half, 2))?;
        let x0 = pairs.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let x1 = pairs.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        let (r0, r1) = rotate(&x0, &x1)?;
        Tensor::stack(&[r0, r1], D::Minus1)?.reshape((b, h, t, d))
    } else {
        let x0 = x.narrow(D::Minus1, 0, half)?;
        let x1 = x.narrow(D::Minus1, half, half)?;
        let (r0, r1) = rotate(&x0, &x1)?;
        Tensor::cat(&[r0, r1], D::Minus1)
    }
}
