//! Softmax composed of candle ops (device-generic; candle differentiates it), and the
//! log-softmax and causal mask the other composites build on.

use candle_core::{DType, Device, Result, Tensor, D};

/// `softmax(x)` over the last dim composed of candle ops: `exp(x - max) / sum(exp(x - max))`.
/// The max is detached: softmax is shift-invariant, so its gradient path is pure overhead.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Causal softmax of scores `[.., T, T]` with the additive `mask` of [`causal_mask`]:
/// `softmax(scores + mask)`.
pub fn causal_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    softmax_last(&scores.broadcast_add(mask)?)
}

/// `log_softmax(x)` over the last dim: `x - max - log(sum(exp(x - max)))`, the max detached.
/// The same formula as `models::nn::log_softmax_last`, written here because kernels import no
/// model; both give way to the shared helper in `retort_core` when it lands.
pub(crate) fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// Additive causal mask `[n, n]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)
}
