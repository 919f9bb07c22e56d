//! Differentiable tensor ops that loss terms, routers and plugins share.
//!
//! Each is composed of candle ops that candle differentiates (candle's own fast
//! `softmax_last_dim` has no backward: the gradient silently vanishes). They return candle's
//! `Result`, so they compose inside model code as well as in terms (`?` converts into
//! retort's [`crate::Error`]).

use candle_core::{Result, Tensor, D};

/// `log_softmax(x)` over the last dim: `x - m - log(sum_j exp(x_j - m))`, `m = max_j x_j`.
///
/// The max is detached: the result is shift-invariant, so a gradient path through `m` would
/// only add terms that cancel.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `softmax(x)` over the last dim: `exp(x - m) / sum_j exp(x_j - m)`, `m = max_j x_j`
/// detached (shift invariance, as in [`log_softmax`]).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Weighted mean of per-token values `v [batch, seq]` as a scalar:
/// `sum_i w_i v_i / max(sum_i w_i, 1)`, or `mean_i v_i` when `weights` is `None`.
///
/// `w` is a padding mask (1 for tokens that count, 0 for padding), possibly multiplied by
/// per-token weights; it is cast to the dtype of `v`. The `max(., 1)` makes an all-padding
/// batch 0 rather than NaN. [`crate::StepContext::token_mean`] builds `w` from a step.
pub fn masked_mean(per_token: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    match weights {
        None => per_token.mean_all(),
        Some(w) => {
            let w = w.to_dtype(per_token.dtype())?;
            let count = w.sum_all()?;
            let total = (per_token * &w)?.sum_all()?;
            let count = count.maximum(1.0)?;
            total.div(&count)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn log_softmax_and_softmax_match_the_formula() {
        let rows = [[0.5f64, -1.0, 2.0, 0.0], [1000.0, 1001.0, 999.0, 1000.5]];
        let x = Tensor::new(&rows, &Device::Cpu).expect("x");
        let lp = log_softmax(&x).expect("lsm").to_vec2::<f64>().expect("v");
        let p = softmax(&x).expect("sm").to_vec2::<f64>().expect("v");
        for (r, z) in rows.iter().enumerate() {
            // Reference: log p_j = z_j - log(sum_k exp(z_k)), shifted by the max in f64.
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let want: Vec<f64> = z.iter().map(|v| v - lse).collect();
            close(&lp[r], &want, 1e-12);
            close(&p[r], &want.iter().map(|v| v.exp()).collect::<Vec<_>>(), 1e-12);
        }
    }

    #[test]
    fn log_softmax_is_differentiable() {
        // d/dx_j sum_k c_k log p_k = c_j - p_j sum_k c_k.
        let x = Var::new(&[[0.3f64, -0.2, 1.1]], &Device::Cpu).expect("x");
        let c = Tensor::new(&[[1.0f64, 2.0, -0.5]], &Device::Cpu).expect("c");
        let loss = (log_softmax(x.as_tensor()).expect("lsm") * &c)
            .expect("mul")
            .sum_all()
            .expect("sum");
        let g = loss.backward().expect("bwd");
        let got = g.get(x.as_tensor()).expect("grad").to_vec2::<f64>().expect("v");
        let p = softmax(x.as_tensor()).expect("sm").to_vec2::<f64>().expect("v");
        let want: Vec<f64> = [1.0, 2.0, -0.5].iter().zip(&p[0]).map(|(c, p)| c - p * 2.5).collect();
        close(&got[0], &want, 1e-12);
    }

    #[test]
    fn masked_mean_weights_tokens_and_survives_all_padding() {
        let v = Tensor::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).expect("v");
        let mean = |w: Option<&Tensor>| masked_mean(&v, w).expect("mean").to_scalar::<f32>().expect("s");
        assert_eq!(mean(None), 3.5);
        let w = Tensor::new(&[[1.0f32, 0.0, 2.0], [0.0, 1.0, 0.0]], &Device::Cpu).expect("w");
        // (1 * 1 + 2 * 3 + 1 * 5) / 4
        assert_eq!(mean(Some(&w)), 3.0);
        let mask = Tensor::new(&[[1u8, 0, 1], [0, 0, 0]], &Device::Cpu).expect("m");
        assert_eq!(mean(Some(&mask)), 2.0);
        let none = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).expect("z");
        assert_eq!(mean(Some(&none)), 0.0);
    }
}
