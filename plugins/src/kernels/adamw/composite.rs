//! The AdamW update and the gradients' sums of squares composed of candle ops.

use candle_core::{DType, Device, Result, Tensor};

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

/// `sum(x^2)` of each of `xs` in f64 by candle ops on their device; one transfer to the host
/// for all of them (on a GPU, one synchronisation instead of one per tensor).
pub fn sum_squares(xs: &[Tensor]) -> Result<Vec<f64>> {
    if xs.is_empty() {
        return Ok(Vec::new());
    }
    let sums = xs
        .iter()
        .map(|x| x.to_dtype(DType::F64)?.sqr()?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)?.to_device(&Device::Cpu)?.to_vec1()
}
