//! `kl`: forward KL divergence from the teacher to the student at temperature `T`
//! (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").
//!
//! `L = T^2 * mean_tokens sum_v p_t(v) * (log p_t(v) - log p_s(v))`, with
//! `p_t = softmax(z_t / T)`, `p_s = softmax(z_s / T)`. The `T^2` factor keeps the gradient scale
//! independent of `T`; `scale_by_t2 = false` turns it off. `T` may be a schedule.
//!
//! Against a teacher that has only its top-`k` distribution (a logit cache, `teacher.kind =
//! "cached"`), the term is `topk_kl` over all `k` stored entries with the tail mass `m` spread
//! uniformly over the other `V - k` tokens, then tempered (`tail = "uniform"`; formula there).
//! The tail's shape is not stored, so this is not the dense KL (it is when `k = V`). At `T > 1`
//! the true tempered tail can be most of the target (82% of the mass at `T = 2` for SmolLM2's
//! top-64 of 49,152); spreading evenly puts 93% there, keeping the tail as one tempered outcome
//! (`tail = "bucket"`) 7%. Measured, the uniform tail trained the better student in every
//! setting tried (docs/cache-format.md), so it is the default; `topk_kl` offers both.
//!
//! ```toml
//! [[loss]]
//! kind = "kl"
//! weight = 0.5
//! temperature = 2.0        # or { kind = "linear", start = 3.0, end = 2.0 }
//! ```

use candle_core::Tensor;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Result};

use crate::kernels::divergence::{self, composite, Divergence as FusedKind};

use super::{as_float, check_same_shape};

use super::logit::{DivergenceTerm, FusableParams, Tempered};
use super::topk_kl::TopkKl;

/// Per-token `sum_v p_t (log p_t - log p_s)` at temperature `t`, shape `[b, s]`: the
/// divergence op (the fused kernel for CPU f32/f64 logits, composed candle ops otherwise).
pub fn kl_per_token(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    let (zs, zt) = (as_float(student)?, as_float(teacher)?);
    check_same_shape(&zs, &zt)?;
    Ok(divergence::per_token(&zs, &zt, t, FusedKind::Forward)?)
}

/// Per-token `sum_v p_t (log p_t - log p_s)` from tempered log-probabilities.
pub fn forward_kl_from_log_probs(ls: &Tensor, lt: &Tensor) -> Result<Tensor> {
    Ok(composite::forward_kl(ls, lt)?)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    if let Some(k) = ctx.teacher_topk {
        let p: FusableParams = params.parse()?;
        let tempered = Tempered::new(params, ctx, &p.temperature, p.scale_by_t2.unwrap_or(true))?;
        return Ok(Box::new(TopkKl::sparse_kl(k, tempered)));
    }
    Ok(Box::new(DivergenceTerm::build_fusable(
        params,
        ctx,
        forward_kl_from_log_probs,
        FusedKind::Forward,
        true,
    )?))
}

#[cfg(test)]
pub(crate) fn build_for_test(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    build(params, ctx)
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "kl",
        description: "forward KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al. 2015)",
        build, params: retort_core::registry::params_schema::<FusableParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use super::*;
    use candle_core::Device;
    use retort_core::Progress;

    /// Reference: T^2 * mean_rows sum_v p_t (log p_t - log p_s).
    fn reference_kl(t: f64) -> f64 {
        t * t * reference(t, |ls, lt| (0..4).map(|v| lt[v].exp() * (lt[v] - ls[v])).sum())
    }

    #[test]
    fn matches_reference_values_at_several_temperatures() {
        for t in [0.5, 1.0, 2.0, 4.0] {
            let term = build_term(super::build, serde_json::json!({ "temperature": t })).expect("build");
            let got = value_at(term.as_ref(), Progress::new(0, 1));
            assert!(
                (got - reference_kl(t)).abs() < 1e-12,
                "T={t}: {got} vs {}",
                reference_kl(t)
            );
        }
        let unscaled = build_term(
            super::build,
            serde_json::json!({"temperature": 2.0, "scale_by_t2": false}),
        )
        .expect("b");
        assert!((value_at(unscaled.as_ref(), Progress::new(0, 1)) - reference_kl(2.0) / 4.0).abs() < 1e-12);
        // KL of a distribution with itself is zero.
        let zt = Tensor::new(&[ZT], &Device::Cpu).expect("zt");
        let same = kl_per_token(&zt, &zt, 2.0)
            .expect("kl")
            .abs()
            .expect("a")
            .max_all()
            .expect("m");
        assert!(same.to_scalar::<f64>().expect("s") < 1e-15);
    }

    #[test]
    fn scheduled_temperature_moves_with_progress() {
        let term = build_term(
            super::build,
            serde_json::json!({"temperature": {"kind": "linear", "start": 3.0, "end": 2.0}}),
        )
        .expect("build");
        assert!((value_at(term.as_ref(), Progress::new(0, 10)) - reference_kl(3.0)).abs() < 1e-12);
        assert!((value_at(term.as_ref(), Progress::new(10, 10)) - reference_kl(2.0)).abs() < 1e-12);
        assert_eq!(
            term.scalars(Progress::new(5, 10)),
            vec![("temperature".to_string(), 2.5)]
        );
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let term = build_term(super::build, serde_json::json!({"temperature": 2.0})).expect("build");
        check_gradient(term.as_ref());
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for t in [1.0, 2.5] {
            check_fused_matches_composite(super::build, serde_json::json!({ "temperature": t }));
        }
        check_fused_matches_composite(
            super::build,
            serde_json::json!({"temperature": 0.7, "scale_by_t2": false}),
        );
    }

    #[test]
    fn rejects_temperatures_outside_the_f32_range_even_inside_a_schedule() {
        for t in [
            serde_json::json!(0.0),
            serde_json::json!(-1.0),
            serde_json::json!(1e-30),
            serde_json::json!(1e30),
            serde_json::json!({"kind": "linear", "start": 2.0, "end": 5000.0}),
            serde_json::json!({"kind": "linear", "start": 2.0, "end": -1.0}),
        ] {
            let err = build_term(super::build, serde_json::json!({ "temperature": t }))
                .err()
                .expect("must fail");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("loss[0].temperature"), "{err}");
        }
    }
}
