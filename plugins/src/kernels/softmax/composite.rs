//! Softmax composed of candle ops (device-generic; candle differentiates it), and the
//! log-softmax and causal mask the other composites build on.

use candle_core::{DType, Device, Result, Tensor};

/// `softmax(x)` over the last dim composed of candle ops: `exp(x - max) / sum(exp(x - max))`,
/// the max detached ([`retort_core::ops::softmax`], shared with plugins).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    retort_core::ops::softmax(x)
}

/// Causal softmax of scores `[.., T, T]` with the additive `mask` of [`causal_mask`]:
/// `softmax(scores + mask)`.
pub fn causal_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    softmax_last(&scores.broadcast_add(mask)?)
}

/// Additive causal mask `[n, n]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)
}
