//! `tvd`: total variation distance between teacher and student distributions
//! (as a distillation objective e.g. in Wen et al., 2023, "f-Divergence Minimization for
//! Sequence-Level Knowledge Distillation").
//!
//! `L = s * mean_tokens 0.5 * sum_v |p_t(v) - p_s(v)|`, `p = softmax(z / T)`, `s = T^2` only if
//! `scale_by_t2` (default false). Bounded in `[0, 1]` per token.
//!
//! Computed by the fused divergence op (`kernels::divergence`, `Tvd`: one kernel over the
//! logits on CPU f32/f64, its composite elsewhere); `fused = false` composes candle ops over
//! the full log-probabilities (the reference, [`tvd_per_token`]).
//!
//! ```toml
//! [[loss]]
//! kind = "tvd"
//! temperature = 1.0
//! ```

use candle_core::Tensor;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Result};

use crate::kernels::divergence::{composite, Divergence as FusedKind};

use super::logit::{DivergenceTerm, FusableParams};

/// Per-token `0.5 * sum_v |p_t - p_s|` from tempered log-probabilities.
pub fn tvd_per_token(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    Ok(composite::tvd(ls, lt)?)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(DivergenceTerm::build_fusable(
        params,
        ctx,
        tvd_per_token,
        FusedKind::Tvd,
        false,
    )?))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "tvd",
        description: "total variation distance 0.5 * sum |p_t - p_s| between teacher and student",
        build, params: retort_core::registry::params_schema::<FusableParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use retort_core::Progress;

    #[test]
    fn matches_reference_values() {
        // Reference: mean_rows 0.5 * sum_v |p_t - p_s|.
        for t in [1.0, 3.0] {
            let want = reference(t, |ls, lt| {
                0.5 * (0..4).map(|v| (lt[v].exp() - ls[v].exp()).abs()).sum::<f64>()
            });
            let term = build_term(super::build, serde_json::json!({ "temperature": t })).expect("build");
            let got = value_at(term.as_ref(), Progress::new(0, 1));
            assert!((got - want).abs() < 1e-12, "T={t}: {got} vs {want}");
        }
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let term = build_term(super::build, serde_json::json!({})).expect("build");
        check_gradient(term.as_ref());
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for t in [1.0, 2.5] {
            check_fused_matches_composite(super::build, serde_json::json!({ "temperature": t }));
        }
    }
}
