//! Differentiable building blocks.
//!
//! candle's fast `LayerNorm` (contiguous input with bias), `ops::softmax_last_dim` and
//! `ops::rms_norm` have no backward: `backward()` succeeds and the parameters silently get no
//! gradient. Everything here is differentiable: on CPU f32/f64 tensors softmax, LayerNorm and
//! GELU run as fused kernels with a real backward (`crate::kernels`), elsewhere (and as the
//! `*_composite` references) they are composed of ops that candle differentiates.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::kernels;

/// `softmax(x)` over the last dim: the fused kernel on CPU f32/f64, else
/// [`softmax_last_composite`].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if kernels::fusable(x) {
        return kernels::softmax::softmax(x, false);
    }
    softmax_last_composite(x)
}

/// Causal attention probabilities from scores `[.., T, T]`: row `i` attends to `0..=i`. The
/// fused kernel on CPU f32/f64 (no mask tensor is touched), else `softmax(scores + mask)` with
/// the additive mask `[T, T]` of [`causal_mask`].
pub fn causal_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if kernels::fusable(scores) {
        return kernels::softmax::softmax(scores, true);
    }
    softmax_last_composite(&scores.broadcast_add(mask)?)
}

/// Causal self-attention `softmax(scale q k^T + mask) v` of `q [B, H, T, d]`, `k`, `v
/// [B, H, T, d]` (any strides), returned as `[B, T, H d]`: the fused kernel
/// (`kernels::attention`: no `[T, T]` tensor, a backward that recomputes the probabilities) on
/// CPU f32/f64, else [`causal_attention_composite`] with the additive `mask` (`[T, T]`, see
/// [`causal_mask`]).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if kernels::fusable(q) && q.dtype() == k.dtype() && q.dtype() == v.dtype() {
        return kernels::attention::causal_attention(q, k, v, scale);
    }
    causal_attention_composite(q, k, v, scale, mask)
}

/// [`causal_attention`] composed of candle ops: `causal_softmax((q * scale) k^T) v`, heads moved
/// back beside each other per token.
pub fn causal_attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let scores = matmul(&(q * scale)?.contiguous()?, &k.contiguous()?.t()?)?;
    let probs = causal_softmax(&scores, mask)?;
    matmul(&probs, &v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, h * d))
}

/// GELU, tanh approximation: the fused kernel on CPU f32/f64, else candle's `gelu`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if kernels::fusable(x) {
        return kernels::gelu::gelu(x);
    }
    x.gelu()
}

/// `softmax(x)` over the last dim composed of candle ops: `exp(x - max) / sum(exp(x - max))`.
/// The max is detached: softmax is shift-invariant, so its gradient path is pure overhead.
pub fn softmax_last_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// `log_softmax(x)` over the last dim: `x - max - log(sum(exp(x - max)))`
/// ([`retort_core::ops::log_softmax`]).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    retort_core::ops::log_softmax(x)
}

/// LayerNorm over the last dim (Ba et al., 2016): `(x - mean) / sqrt(var + eps) * w + b`; the
/// fused kernel on CPU f32/f64, else [`layer_norm_composite`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::fusable(x) && weight.dtype() == x.dtype() && bias.dtype() == x.dtype() {
        return kernels::layer_norm::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] composed of candle ops.
pub fn layer_norm_composite(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm over the last dim (Zhang & Sennrich, 2019): `x / sqrt(mean(x^2) + eps) * w`; the
/// fused kernel on CPU f32/f64 (`kernels::rms_norm`), else [`rms_norm_composite`] (candle's
/// `ops::rms_norm` has no backward).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels::fusable(x) && weight.dtype() == x.dtype() {
        return kernels::rms_norm::rms_norm(x, weight, eps);
    }
    rms_norm_composite(x, weight, eps)
}

/// The SwiGLU gate `silu(g) * u` (Shazeer, 2020): the fused kernel on CPU f32/f64
/// (`kernels::swiglu`), else candle's `silu` and `mul`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fused_pair(g, u) {
        return kernels::swiglu::swiglu(g, u);
    }
    g.silu()? * u
}

/// [`rms_norm`] composed of differentiable candle ops.
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

/// `a @ b` (candle's batched `matmul` semantics): through BLAS (`kernels::matmul`) when the
/// crate is built with the `blas` feature and both are CPU f32/f64 tensors with equal batch
/// dims; two CPU f32/f64 matrices through the fused linear kernel (`gemm` with AVX-512, the
/// operands' strides read in place, no zero-filled output); else candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "blas")]
    if kernels::matmul::usable(a, b) {
        return kernels::matmul::matmul(a, b);
    }
    if a.rank() == 2 && b.rank() == 2 && fused_pair(a, b) {
        return kernels::linear::linear(a, b, None);
    }
    a.matmul(b)
}

/// Both tensors can take the fused CPU kernels together (same f32/f64 dtype, CPU).
fn fused_pair(a: &Tensor, b: &Tensor) -> bool {
    kernels::fusable(a) && kernels::fusable(b) && a.dtype() == b.dtype()
}

/// `x @ w + b` with `w` `[in, out]` (any strides: the GPT-2 `Conv1D` layout as stored, or
/// `W.t()` of a `[out, in]` weight) and `b` optional, for `x` of any rank. On CPU f32/f64 this
/// is one fused kernel (`kernels::linear`: product and bias together, backward `dx`, `dW`,
/// `db` in place); elsewhere `matmul` then `broadcast_add`.
pub fn linear_opt(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let fused = fused_pair(x, w) && b.is_none_or(|b| b.dtype() == w.dtype() && kernels::fusable(b));
    #[cfg(feature = "blas")]
    let fused = fused && !kernels::matmul::usable(x, w);
    if fused {
        // Any rank: the kernel folds the leading dims itself (no reshape nodes).
        return kernels::linear::linear(x, w, b);
    }
    let dims = x.dims().to_vec();
    let (inp, out) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = matmul(&x.reshape((rows, inp))?, w)?;
    let y = match b {
        Some(b) if kernels::fusable(&y) && b.dtype() == y.dtype() => kernels::bias::add_bias(&y, b)?,
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1 checked by reshape") = out;
    y.reshape(out_dims)
}

/// `x @ w + b` with `w` stored `[in, out]` (the GPT-2 `Conv1D` layout); see [`linear_opt`].
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_opt(x, w, Some(b))
}

/// Additive causal mask `[n, n]`: 0 on and below the diagonal, -inf above.
pub fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn softmax_and_log_softmax_match_reference() {
        // Reference: softmax([1, 2, 3]) = e^x / sum e^x = [0.09003057, 0.24472847, 0.66524096].
        let x = Tensor::new(&[[1f64, 2., 3.]], &Device::Cpu).expect("t");
        let p = softmax_last(&x).expect("sm").to_vec2::<f64>().expect("v");
        let want = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219];
        for (a, b) in p[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let lp = log_softmax_last(&x).expect("lsm").to_vec2::<f64>().expect("v");
        for (a, b) in lp[0].iter().zip(want) {
            assert!((a - b.ln()).abs() < 1e-12);
        }
    }

    #[test]
    fn layer_norm_matches_reference_and_has_gradients() {
        // Reference: x = [1, 2, 3, 6]: mean 3, var 3.5, y = (x - 3) / sqrt(3.5 + 1e-5).
        let x = Tensor::new(&[[1f64, 2., 3., 6.]], &Device::Cpu).expect("t");
        let w = Var::new(&[1f64, 1., 1., 1.], &Device::Cpu).expect("w");
        let b = Var::new(&[0f64, 0., 0., 0.], &Device::Cpu).expect("b");
        let y = layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).expect("ln");
        let got = y.to_vec2::<f64>().expect("v");
        for (i, xi) in [1f64, 2., 3., 6.].iter().enumerate() {
            let want = (xi - 3.0) / (3.5f64 + 1e-5).sqrt();
            assert!((got[0][i] - want).abs() < 1e-12);
        }
        // Unlike candle_nn::LayerNorm's fast path, gradients reach weight and bias.
        let loss = (y * Tensor::new(&[[1f64, -2., 3., 0.5]], &Device::Cpu).expect("c")).expect("mul");
        let grads = loss.sum_all().expect("sum").backward().expect("bwd");
        assert!(grads.get(w.as_tensor()).is_some());
        assert!(grads.get(b.as_tensor()).is_some());
    }

    #[test]
    fn rms_norm_matches_reference_and_has_gradients() {
        // Reference: x = [1, 2, 3, 6]: mean(x^2) = 50 / 4 = 12.5, y = x / sqrt(12.5 + 1e-6) * w.
        let x = Tensor::new(&[[1f64, 2., 3., 6.]], &Device::Cpu).expect("t");
        let w = Var::new(&[1f64, 2., 1., 0.5], &Device::Cpu).expect("w");
        let y = rms_norm(&x, w.as_tensor(), 1e-6).expect("rms");
        let got = y.to_vec2::<f64>().expect("v");
        for (i, (xi, wi)) in [1f64, 2., 3., 6.].iter().zip([1f64, 2., 1., 0.5]).enumerate() {
            let want = xi / (12.5f64 + 1e-6).sqrt() * wi;
            assert!((got[0][i] - want).abs() < 1e-12);
        }
        let grads = y.sum_all().expect("sum").backward().expect("bwd");
        assert!(grads.get(w.as_tensor()).is_some());
    }

    #[test]
    fn linear_handles_rank_3() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12., &dev)
            .expect("a")
            .reshape((2, 2, 3))
            .expect("r");
        let w = Tensor::ones((3, 4), DType::F32, &dev).expect("w");
        let b = Tensor::zeros(4, DType::F32, &dev).expect("b");
        let y = linear(&x, &w, &b).expect("lin");
        assert_eq!(y.dims(), &[2, 2, 4]);
        // Row [0, 1, 2] summed = 3.
        assert_eq!(
            y.get(0).expect("g").get(0).expect("g").to_vec1::<f32>().expect("v"),
            vec![3.0; 4]
        );
    }

    #[test]
    fn causal_mask_blocks_future() {
        let m = causal_mask(3, DType::F32, &Device::Cpu)
            .expect("m")
            .to_vec2::<f32>()
            .expect("v");
        assert_eq!(m[0][0], 0.0);
        assert!(m[0][1].is_infinite() && m[0][1] < 0.0);
        assert_eq!(m[2][1], 0.0);
    }
}
