//! `ce`: cross-entropy with the hard next-token labels, optionally label-smoothed
//! (Szegedy et al., 2016).
//!
//! `L = mean_tokens [ (1 - eps) * -log p_s(y) + eps * mean_v(-log p_s(v)) ]`, with
//! `p_s = softmax(z_s)`; `eps = 0` is plain cross-entropy.
//!
//! ```toml
//! [[loss]]
//! kind = "ce"
//! weight = 0.5
//! label_smoothing = 0.0
//! ```

use candle_core::Tensor;
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Result, StepContext};

use super::logit::yes;
use super::masked_mean;
use crate::kernels::cross_entropy;

/// Params of `ce`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CeParams {
    /// Label smoothing in `[0, 1)`. Default 0.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Use the fused single-pass CPU kernel (default true); `false` composes candle ops.
    #[serde(default = "yes")]
    pub fused: bool,
}

/// Cross-entropy with hard labels.
pub struct CrossEntropy {
    label_smoothing: f64,
    fused: bool,
}

/// Mean cross-entropy of `logits [b, t, v]` against `targets [b, t]` over the masked tokens:
/// the cross-entropy op (the fused kernel for CPU f32/f64 logits, composed candle ops
/// otherwise).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>, label_smoothing: f64) -> Result<Tensor> {
    let per_token = cross_entropy::per_token(logits, targets, label_smoothing)?;
    Ok(masked_mean(&per_token, mask)?)
}

/// [`cross_entropy()`] composed of candle ops (the reference, what `fused = false` computes).
pub fn composite_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    label_smoothing: f64,
) -> Result<Tensor> {
    let per_token = cross_entropy::composite::per_token(logits, targets, label_smoothing)?;
    Ok(masked_mean(&per_token, mask)?)
}

impl LossTerm for CrossEntropy {
    fn per_token_form(&self) -> bool {
        true
    }
    fn router_token_weighted(&self) -> bool {
        false
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        let (logits, targets, eps) = (&ctx.student.logits, &ctx.batch.targets, self.label_smoothing);
        let per_token = if self.fused {
            cross_entropy::per_token(logits, targets, eps)?
        } else {
            cross_entropy::composite::per_token(logits, targets, eps)?
        };
        Ok((per_token, 1.0))
    }
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let f = if self.fused {
            cross_entropy
        } else {
            composite_cross_entropy
        };
        f(
            &ctx.student.logits,
            &ctx.batch.targets,
            ctx.batch.mask.as_ref(),
            self.label_smoothing,
        )
    }
    fn needs_teacher(&self) -> bool {
        false
    }
}

fn build(params: &Params, _ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: CeParams = params.parse()?;
    if !(0.0..1.0).contains(&p.label_smoothing) {
        return Err(params.error(
            "label_smoothing",
            format!("expected a number in [0, 1), got {}", p.label_smoothing),
        ));
    }
    Ok(Box::new(CrossEntropy {
        label_smoothing: p.label_smoothing,
        fused: p.fused,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "ce",
        description: "cross-entropy with the hard next-token labels (optional label smoothing)",
        build, params: retort_core::registry::params_schema::<CeParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn logits() -> Tensor {
        Tensor::new(&[[[1.0f64, 2.0, 0.5], [0.0, -1.0, 3.0]]], &Device::Cpu).expect("t")
    }

    #[test]
    fn matches_reference_values() {
        // Reference: -log softmax(z)[y] per row, by hand in f64.
        let rows = [[1.0f64, 2.0, 0.5], [0.0, -1.0, 3.0]];
        let ys = [1usize, 0];
        let lse = |r: &[f64; 3]| r.iter().map(|x| x.exp()).sum::<f64>().ln();
        let want = (0..2).map(|i| lse(&rows[i]) - rows[i][ys[i]]).sum::<f64>() / 2.0;
        let y = Tensor::new(&[[1u32, 0]], &Device::Cpu).expect("y");
        let got = cross_entropy(&logits(), &y, None, 0.0)
            .expect("ce")
            .to_scalar::<f64>()
            .expect("s");
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // With the second token masked out, only the first counts.
        let m = Tensor::new(&[[1f64, 0.0]], &Device::Cpu).expect("m");
        let got = cross_entropy(&logits(), &y, Some(&m), 0.0)
            .expect("ce")
            .to_scalar::<f64>()
            .expect("s");
        assert!((got - (lse(&rows[0]) - rows[0][1])).abs() < 1e-12);
        // Label smoothing eps: (1-eps) nll + eps * mean_v(lse - z_v).
        let eps = 0.1;
        let want_ls = (0..2)
            .map(|i| {
                let nll = lse(&rows[i]) - rows[i][ys[i]];
                let u = rows[i].iter().map(|z| lse(&rows[i]) - z).sum::<f64>() / 3.0;
                (1.0 - eps) * nll + eps * u
            })
            .sum::<f64>()
            / 2.0;
        let got = cross_entropy(&logits(), &y, None, eps)
            .expect("ce")
            .to_scalar::<f64>()
            .expect("s");
        assert!((got - want_ls).abs() < 1e-12);
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let z0 = logits();
        let y = Tensor::new(&[[2u32, 1]], &Device::Cpu).expect("y");
        let z = Var::from_tensor(&z0).expect("v");
        let g = cross_entropy(z.as_tensor(), &y, None, 0.1)
            .expect("ce")
            .backward()
            .expect("b");
        let g: Vec<f64> = g
            .get(z.as_tensor())
            .expect("g")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let base: Vec<f64> = z0.flatten_all().expect("f").to_vec1().expect("v");
        for i in 0..base.len() {
            let f = |d: f64| {
                let mut w = base.clone();
                w[i] += d;
                let t = Tensor::from_vec(w, (1, 2, 3), &Device::Cpu).expect("t");
                cross_entropy(&t, &y, None, 0.1)
                    .expect("ce")
                    .to_scalar::<f64>()
                    .expect("s")
            };
            let num = (f(1e-6) - f(-1e-6)) / 2e-6;
            assert!((num - g[i]).abs() < 1e-7, "{i}: {num} vs {}", g[i]);
        }
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_smoothing() {
        for eps in [0.0, 0.1] {
            super::super::logit::testutil::check_fused_matches_composite(
                super::build,
                serde_json::json!({ "label_smoothing": eps }),
            );
        }
    }

    #[test]
    fn rejects_bad_smoothing() {
        let p = Params::new(
            "loss[1]",
            serde_json::json!({"label_smoothing": 1.5})
                .as_object()
                .expect("o")
                .clone(),
        );
        let r = retort_core::Registry::empty();
        let ctx = BuildContext::new(&r, Device::Cpu, 0);
        let msg = build(&p, &ctx).err().expect("err").to_string();
        assert!(msg.contains("loss[1].label_smoothing"), "{msg}");
    }
}
