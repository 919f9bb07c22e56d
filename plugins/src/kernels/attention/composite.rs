//! Causal attention composed of candle ops (device-generic; candle differentiates it).

use candle_core::{Result, Tensor, D};

use crate::kernels::softmax::causal_softmax;

/// `causal_softmax((q * scale) k^T, mask) v` of `q`, `k`, `v` `[B, H, T, d]`, heads moved back
/// beside each other per token: `[B, T, H d]`. The softmax is [`causal_softmax`] (itself fused
/// where it can be).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let scores = (q * scale)?.contiguous()?.matmul(&k.contiguous()?.t()?)?;
    let probs = causal_softmax(&scores, mask)?;
    probs.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((b, t, h * d))
}

/// [`causal_attention`] of the `q`, `k`, `v` views of a projection `qkv [B, T, (H + 2 H_kv) d]`
/// (query heads, then key heads, then value heads); composed, `H_kv` must equal `H`.
pub fn causal_attention_packed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let d = w / (heads + 2 * kv_heads).max(1);
    let split = |from: usize, n: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, from * d, n * d)?
            .reshape((b, t, n, d))?
            .transpose(1, 2)
    };
    let (q, k, v) = (
        split(0, heads)?,
        split(heads, kv_heads)?,
        split(heads + kv_heads, kv_heads)?,
    );
    causal_attention(&q, &k, &v, scale, mask)
}
