//! `jsd`: generalized Jensen-Shannon divergence with interpolation `beta` (GKD: Agarwal et al.,
//! 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes").
//!
//! With `p_t`, `p_s` at temperature `T` and the mixture `m = beta * p_t + (1 - beta) * p_s`:
//! `JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` for `0 < beta < 1`;
//! at the ends, as in GKD, `beta = 0` is forward `KL(p_t || p_s)` and `beta = 1` is reverse
//! `KL(p_s || p_t)`. `L = s * mean_tokens JSD_beta`, `s = T^2` only if `scale_by_t2`
//! (default false: GKD does not scale). `beta` may be a schedule.
//!
//! ```toml
//! [[loss]]
//! kind = "jsd"
//! beta = 0.5
//! temperature = 1.0
//! ```

use candle_core::Tensor;
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Progress, Result, Scalar, ScalarSpec, StepContext};

use super::logit::{one, yes, Tempered};
use crate::kernels::divergence::{composite, Divergence as FusedKind};

/// Params of `jsd`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsdParams {
    /// Interpolation in `[0, 1]`: 0 is forward KL, 1 reverse KL. Default 0.5.
    #[serde(default = "half")]
    pub beta: ScalarSpec,
    /// Temperature `T > 0`. Default 1.0.
    #[serde(default = "one")]
    pub temperature: ScalarSpec,
    /// Multiply by `T^2`. Default false.
    #[serde(default)]
    pub scale_by_t2: bool,
    /// Use the fused single-pass CPU kernel (default true); `false` composes candle ops.
    #[serde(default = "yes")]
    pub fused: bool,
}

fn half() -> ScalarSpec {
    ScalarSpec::Number(0.5)
}

/// Generalized JSD.
pub struct Jsd {
    beta: Scalar,
    tempered: Tempered,
    fused: bool,
}

/// Per-token `JSD_beta(p_t, p_s)` from log-probabilities `ls`, `lt`, shape `[.., v] -> [..]`.
pub fn jsd_per_token(ls: &Tensor, lt: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(composite::jsd(ls, lt, beta)?)
}

impl LossTerm for Jsd {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        let beta = self.beta.at(ctx.progress);
        let (per_token, t) = if self.fused {
            self.tempered.fused(ctx, FusedKind::Jsd(beta))?
        } else {
            let (ls, lt, t) = self.tempered.log_probs(ctx)?;
            (jsd_per_token(&ls, &lt, beta)?, t)
        };
        Ok((per_token, self.tempered.scale(t)))
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        let mut v = self.tempered.scalars(progress);
        v.push(("beta".into(), self.beta.at(progress)));
        v
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: JsdParams = params.parse()?;
    Ok(Box::new(Jsd {
        beta: p.beta.build_in(&params.key_path("beta"), ctx, 0.0, 1.0)?,
        tempered: Tempered::new(params, ctx, &p.temperature, p.scale_by_t2)?,
        fused: p.fused,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "jsd",
        description: "generalized Jensen-Shannon divergence, beta interpolates forward/reverse KL (GKD, Agarwal et al. 2024)",
        build, params: retort_core::registry::params_schema::<JsdParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use super::*;

    /// Reference: beta KL(p_t||m) + (1-beta) KL(p_s||m), m = beta p_t + (1-beta) p_s, in f64.
    fn reference_jsd(beta: f64, t: f64) -> f64 {
        reference(t, |ls, lt| {
            let (ps, pt): (Vec<f64>, Vec<f64>) = (
                ls.iter().map(|x| x.exp()).collect(),
                lt.iter().map(|x| x.exp()).collect(),
            );
            let m: Vec<f64> = (0..4).map(|v| beta * pt[v] + (1.0 - beta) * ps[v]).collect();
            let kl = |p: &[f64], q: &[f64]| (0..4).map(|v| p[v] * (p[v] / q[v]).ln()).sum::<f64>();
            if beta == 0.0 {
                kl(&pt, &ps)
            } else if beta == 1.0 {
                kl(&ps, &pt)
            } else {
                beta * kl(&pt, &m) + (1.0 - beta) * kl(&ps, &m)
            }
        })
    }

    #[test]
    fn matches_reference_values_across_beta() {
        for beta in [0.0, 0.1, 0.5, 0.9, 1.0] {
            let term = build_term(super::build, serde_json::json!({"beta": beta, "temperature": 1.5})).expect("build");
            let got = value_at(term.as_ref(), Progress::new(0, 1));
            let want = reference_jsd(beta, 1.5);
            assert!((got - want).abs() < 1e-12, "beta={beta}: {got} vs {want}");
        }
        // JSD is bounded by ln 2 (at beta = 0.5 it is the classic symmetric JSD).
        assert!(reference_jsd(0.5, 1.0) < 2f64.ln());
    }

    #[test]
    fn gradient_matches_finite_difference() {
        for beta in [0.3, 1.0] {
            let term = build_term(super::build, serde_json::json!({ "beta": beta })).expect("build");
            check_gradient(term.as_ref());
        }
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for (beta, t) in [(0.5, 1.0), (0.1, 2.0), (0.0, 1.5), (1.0, 1.0)] {
            check_fused_matches_composite(
                super::build,
                serde_json::json!({"beta": beta, "temperature": t, "scale_by_t2": true}),
            );
        }
    }

    #[test]
    fn rejects_beta_outside_unit_interval() {
        let err = build_term(super::build, serde_json::json!({"beta": 1.5}))
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("loss[0].beta"), "{err}");
    }
}
