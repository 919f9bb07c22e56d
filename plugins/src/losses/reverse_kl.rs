//! `reverse_kl`: reverse KL divergence from the student to the teacher, token level
//! (the objective of MiniLLM: Gu, Dong, Wei & Huang, 2024, "MiniLLM: Knowledge Distillation of
//! Large Language Models"; here on the training tokens, without MiniLLM's policy-gradient
//! sampling). Mode-seeking: the student is punished for mass where the teacher has little.
//!
//! `L = s * mean_tokens sum_v p_s(v) * (log p_s(v) - log p_t(v))`, `p = softmax(z / T)`,
//! `s = T^2` when `scale_by_t2` (default true), else 1.
//!
//! ```toml
//! [[loss]]
//! kind = "reverse_kl"
//! temperature = 1.0
//! ```

use candle_core::Tensor;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Result};

use crate::kernels::divergence::{composite, Divergence as FusedKind};

use super::logit::{DivergenceTerm, FusableParams};

/// Per-token `sum_v p_s (log p_s - log p_t)`.
pub fn reverse_kl_per_token(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    Ok(composite::reverse_kl(ls, lt)?)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(DivergenceTerm::build_fusable(
        params,
        ctx,
        reverse_kl_per_token,
        FusedKind::Reverse,
        true,
    )?))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "reverse_kl",
        description: "reverse KL(student || teacher), mode-seeking (MiniLLM, Gu et al. 2024)",
        build, params: retort_core::registry::params_schema::<FusableParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use retort_core::Progress;

    #[test]
    fn matches_reference_values() {
        // Reference: T^2 * mean_rows sum_v p_s (log p_s - log p_t).
        for t in [1.0, 2.0] {
            let want = t * t * reference(t, |ls, lt| (0..4).map(|v| ls[v].exp() * (ls[v] - lt[v])).sum());
            let term = build_term(super::build, serde_json::json!({ "temperature": t })).expect("build");
            let got = value_at(term.as_ref(), Progress::new(0, 1));
            assert!((got - want).abs() < 1e-12, "T={t}: {got} vs {want}");
        }
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let term = build_term(super::build, serde_json::json!({"temperature": 1.5})).expect("build");
        check_gradient(term.as_ref());
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for t in [1.0, 2.0] {
            check_fused_matches_composite(super::build, serde_json::json!({ "temperature": t }));
        }
    }
}
