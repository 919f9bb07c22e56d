//! `skew_kl`: skew KL divergence (DistiLLM: Ko, Kim, Chen & Yun, 2024, "DistiLLM: Towards
//! Streamlined Distillation for Large Language Models").
//!
//! Forward skew KL: `KL(p_t || alpha * p_t + (1 - alpha) * p_s)`; reverse skew KL:
//! `KL(p_s || alpha * p_s + (1 - alpha) * p_t)`. Mixing a little of the target distribution
//! into the second argument bounds the divergence and stabilises its gradient; `alpha = 0` is
//! plain (forward or reverse) KL. `L = s * mean_tokens`, `s = T^2` only if `scale_by_t2`
//! (default false: DistiLLM uses no temperature). `alpha` may be a schedule.
//!
//! Computed by the fused divergence op (`kernels::divergence`, `SkewForward` / `SkewReverse`:
//! one kernel over the logits on CPU f32/f64, its composite elsewhere); `fused = false`
//! composes candle ops over the full log-probabilities (the reference).
//!
//! ```toml
//! [[loss]]
//! kind = "skew_kl"
//! direction = "forward"   # or "reverse"
//! alpha = 0.1
//! ```

use candle_core::Tensor;
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Progress, Result, Scalar, ScalarSpec, StepContext};

use super::logit::{one, yes, Tempered};
use crate::kernels::divergence::Divergence as FusedKind;

/// Which argument is skewed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// `KL(p_t || alpha p_t + (1 - alpha) p_s)`.
    Forward,
    /// `KL(p_s || alpha p_s + (1 - alpha) p_t)`.
    Reverse,
}

impl Direction {
    /// The divergence op's kind for skew `alpha`.
    fn kind(self, alpha: f64) -> FusedKind {
        match self {
            Direction::Forward => FusedKind::SkewForward(alpha),
            Direction::Reverse => FusedKind::SkewReverse(alpha),
        }
    }
}

/// Params of `skew_kl`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SkewParams {
    /// `forward` (default) or `reverse`.
    #[serde(default = "forward")]
    pub direction: Direction,
    /// Skew in `[0, 1)`. Default 0.1.
    #[serde(default = "tenth")]
    pub alpha: ScalarSpec,
    /// Temperature `T > 0`. Default 1.0.
    #[serde(default = "one")]
    pub temperature: ScalarSpec,
    /// Multiply by `T^2`. Default false.
    #[serde(default)]
    pub scale_by_t2: bool,
    /// Use the fused kernel (default true); `false` composes candle ops.
    #[serde(default = "yes")]
    pub fused: bool,
}

fn forward() -> Direction {
    Direction::Forward
}
fn tenth() -> ScalarSpec {
    ScalarSpec::Number(0.1)
}

/// Skew KL.
pub struct SkewKl {
    direction: Direction,
    alpha: Scalar,
    tempered: Tempered,
    fused: bool,
}

impl LossTerm for SkewKl {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        let kind = self.direction.kind(self.alpha.at(ctx.progress));
        let (per_token, t) = self.tempered.per_token(ctx, kind, self.fused)?;
        Ok((per_token, self.tempered.scale(t)))
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        let mut v = self.tempered.scalars(progress);
        v.push(("alpha".into(), self.alpha.at(progress)));
        v
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: SkewParams = params.parse()?;
    let alpha = p.alpha.build(&params.key_path("alpha"), ctx)?;
    alpha.check(
        &params.key_path("alpha"),
        |a| (0.0..1.0).contains(&a),
        "a number in [0, 1)",
    )?;
    Ok(Box::new(SkewKl {
        direction: p.direction,
        alpha,
        tempered: Tempered::new(params, ctx, &p.temperature, p.scale_by_t2)?,
        fused: p.fused,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "skew_kl",
        description: "forward or reverse skew KL with skew alpha (DistiLLM, Ko et al. 2024)",
        build, params: retort_core::registry::params_schema::<SkewParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use super::*;

    /// Reference in f64: KL(p || alpha p + (1 - alpha) q).
    fn skew(p: &[f64], q: &[f64], alpha: f64) -> f64 {
        (0..4)
            .map(|v| p[v] * (p[v] / (alpha * p[v] + (1.0 - alpha) * q[v])).ln())
            .sum()
    }

    #[test]
    fn matches_reference_values() {
        for (dir, alpha) in [("forward", 0.1), ("reverse", 0.1), ("forward", 0.0), ("reverse", 0.5)] {
            let term = build_term(super::build, serde_json::json!({"direction": dir, "alpha": alpha})).expect("build");
            let got = value_at(term.as_ref(), Progress::new(0, 1));
            let want = reference(1.0, |ls, lt| {
                let (ps, pt): (Vec<f64>, Vec<f64>) = (
                    ls.iter().map(|x| x.exp()).collect(),
                    lt.iter().map(|x| x.exp()).collect(),
                );
                if dir == "forward" {
                    skew(&pt, &ps, alpha)
                } else {
                    skew(&ps, &pt, alpha)
                }
            });
            assert!((got - want).abs() < 1e-12, "{dir} alpha={alpha}: {got} vs {want}");
        }
    }

    #[test]
    fn gradient_matches_finite_difference() {
        for dir in ["forward", "reverse"] {
            let term = build_term(
                super::build,
                serde_json::json!({"direction": dir, "alpha": 0.2, "temperature": 2.0}),
            )
            .expect("build");
            check_gradient(term.as_ref());
        }
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for (dir, alpha, t) in [
            ("forward", 0.1, 1.0),
            ("reverse", 0.5, 2.5),
            ("forward", 0.9, 2.5),
            ("reverse", 0.0, 1.0),
        ] {
            check_fused_matches_composite(
                super::build,
                serde_json::json!({"direction": dir, "alpha": alpha, "temperature": t, "scale_by_t2": true}),
            );
        }
    }

    #[test]
    fn rejects_bad_alpha_and_direction() {
        let err = build_term(super::build, serde_json::json!({"alpha": 1.0}))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("loss[0].alpha"), "{err}");
        let err = build_term(super::build, serde_json::json!({"direction": "sideways"}))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("loss[0].direction"), "{err}");
    }
}
