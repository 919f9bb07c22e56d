//! `sampled_reverse_kl`: the single-sample estimate of reverse KL(student || teacher) at tokens
//! the student sampled itself. On-policy distillation trains the student on its own samples
//! (GKD: Agarwal et al., 2024, "On-Policy Distillation of Language Models: Learning from
//! Self-Generated Mistakes", which takes the exact divergence over the vocabulary at those
//! positions: `reverse_kl`, or `jsd` with `beta = 1`, here); this term is the cheaper per-token
//! sampled form of Lu & Thinking Machines Lab, 2025, "On-Policy Distillation" (the recipe also
//! used to distil Qwen3's small models: Yang et al., 2025, "Qwen3 Technical Report").
//!
//! Per token, with `y` the batch's target (the token the student sampled) and `T = 1`:
//!
//! `d = log p_s(y) - log p_t(y)`, `p = softmax(z)`, and
//! `L = mean_tokens d` (value), `grad L = mean_tokens sg(d) * grad log p_s(y)` (gradient),
//!
//! computed per token as `v = sg(d) + (sg(d) * log p_s(y) - sg(sg(d) * log p_s(y)))` (`sg`:
//! stop-gradient), whose value is `d` exactly and whose gradient is `sg(d) * grad log p_s(y)`:
//! the score-function (REINFORCE) estimator with the per-token reward `-d`. The value's own
//! gradient `grad d` is deliberately not used (its expectation over `y ~ p_s` is not the
//! gradient of the KL).
//!
//! Unbiasedness: for `y ~ p_s`, `E[d] = sum_y p_s(y) (log p_s(y) - log p_t(y)) = KL(p_s || p_t)`
//! (the "k1" estimator), and since `E[grad log p_s(y)] = sum_y grad p_s(y) = grad 1 = 0`,
//! `grad KL = sum_y p_s(y) d(y) grad log p_s(y) + sum_y grad p_s(y) = E[d * grad log p_s(y)]`.
//! Both hold only when the targets were sampled from the student itself, at `T = 1` and without
//! truncation (top-k, top-p): the term is meant for on-policy runs in which every sequence is
//! the student's own (an `[on_policy]` run with `lambda = 1`). On dataset or teacher tokens it
//! is neither the reverse KL nor its gradient; use `reverse_kl` (exact, over the vocabulary)
//! there. The estimate is per token (discount 0): a token's effect on the distributions at later
//! positions is ignored, as in the on-policy distillation recipe. The teacher's side takes no
//! gradient.
//!
//! `log p(y)` is the cross-entropy op (`kernels::cross_entropy`, `eps = 0`, negated: the fused
//! kernel on CPU f32/f64 and CUDA logits, its composite elsewhere); `fused = false` composes
//! candle ops (log-softmax and a gather, the reference). Half-precision logits (student or
//! teacher) are read in f32.
//!
//! ```toml
//! [[loss]]
//! kind = "sampled_reverse_kl"   # the batch's targets are the student's own samples
//! weight = 1.0
//!
//! [on_policy]
//! lambda = 1.0                  # required: every step on the student's samples
//! ```

use candle_core::Tensor;
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, LossTerm, Params, Result, StepContext};

use super::logit::yes;
use super::{as_float, check_same_shape};
use crate::kernels::cross_entropy;

/// Params of `sampled_reverse_kl`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SampledReverseKlParams {
    /// Use the fused cross-entropy op for `log p(y)` (default true); `false` composes candle
    /// ops (the reference implementation).
    #[serde(default = "yes")]
    pub fused: bool,
}

/// The single-sample reverse KL at the batch's (student-sampled) targets.
pub struct SampledReverseKl {
    fused: bool,
}

/// `log softmax(logits)[y]` `[..]` of `logits [.., V]` at `targets [..]`: the cross-entropy op
/// with `eps = 0`, negated (`fused`), or its composite of candle ops.
pub fn log_prob_at(logits: &Tensor, targets: &Tensor, fused: bool) -> Result<Tensor> {
    let nll = if fused {
        cross_entropy::per_token(logits, targets, 0.0)?
    } else {
        cross_entropy::composite::per_token(logits, targets, 0.0)?
    };
    Ok(nll.neg()?)
}

/// The per-token surrogate `sg(d) + (sg(d) lp_s - sg(sg(d) lp_s))`, `d = lp_s - lp_t`, of the
/// student's log-probabilities at the targets `lp_s` (attached) and the teacher's `lp_t`: value
/// `d`, gradient `sg(d) grad lp_s`.
pub fn score_function_surrogate(lp_s: &Tensor, lp_t: &Tensor) -> Result<Tensor> {
    let d = (lp_s.detach() - lp_t.detach().to_dtype(lp_s.dtype())?)?;
    let x = (&d * lp_s)?;
    // `x - sg(x)` is exactly 0 forward, so the value is `d` to the last bit.
    Ok((&d + (&x - x.detach())?)?)
}

impl SampledReverseKl {
    /// The per-token surrogate `[b, s]` of the step (see the module doc).
    fn surrogate(&self, ctx: &StepContext) -> Result<Tensor> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("`sampled_reverse_kl` needs teacher outputs".into()))?;
        let zs = as_float(&ctx.student.logits)?;
        let zt = as_float(&teacher.logits.detach())?;
        check_same_shape(&zs, &zt)?;
        let targets = &ctx.batch.targets;
        let lp_s = log_prob_at(&zs, targets, self.fused)?;
        let lp_t = log_prob_at(&zt, targets, self.fused)?;
        score_function_surrogate(&lp_s, &lp_t)
    }
}

impl LossTerm for SampledReverseKl {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        Ok((self.surrogate(ctx)?, 1.0))
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn needs_student_samples(&self) -> bool {
        true
    }
}

fn build(params: &Params, _ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: SampledReverseKlParams = params.parse()?;
    Ok(Box::new(SampledReverseKl { fused: p.fused }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "sampled_reverse_kl",
        description: "reverse KL(student || teacher) sampled at the student's own tokens: log-ratio \
                      value, score-function gradient (on-policy distillation, GKD / Qwen3)",
        build, params: retort_core::registry::params_schema::<SampledReverseKlParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::{build_term, check_fused_matches_composite, logsm, ZS, ZT};
    use candle_core::{DType, Device, Tensor, Var};
    use retort_core::{Batch, LossTerm, Outputs, Progress, StepContext};

    /// Targets of the two [`ZS`] rows.
    const Y: [u32; 2] = [2, 1];

    fn term(fused: bool) -> Box<dyn LossTerm> {
        build_term(super::build, serde_json::json!({ "fused": fused })).expect("build")
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec")
    }

    /// `(value, d value / d zs)` of `term` on student `zs [1, n, v]`, teacher `zt`, targets `y`,
    /// with optional mask and router token weights `[1, n]`.
    fn run(
        term: &dyn LossTerm,
        zs: &Tensor,
        zt: &Tensor,
        y: &[u32],
        mask: Option<&Tensor>,
        token_weights: Option<&Tensor>,
    ) -> (f64, Vec<f64>) {
        let var = Var::from_tensor(zs).expect("var");
        let targets = Tensor::from_vec(y.to_vec(), (1, y.len()), &Device::Cpu).expect("targets");
        let batch = Batch {
            input_ids: targets.clone(),
            targets,
            mask: mask.cloned(),
            source: None,
        };
        let (s, t) = (
            Outputs::logits_only(var.as_tensor().clone()),
            Outputs::logits_only(zt.clone()),
        );
        let ctx = StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&t),
            progress: Progress::new(0, 1),
            token_weights,
        };
        let loss = term.compute(&ctx).expect("compute");
        let grads = loss.backward().expect("backward");
        (
            flat(&loss)[0],
            flat(grads.get(var.as_tensor()).expect("student gradient")),
        )
    }

    fn fixed() -> (Tensor, Tensor) {
        (
            Tensor::new(&[ZS], &Device::Cpu).expect("zs"),
            Tensor::new(&[ZT], &Device::Cpu).expect("zt"),
        )
    }

    /// `d = log p_s(y) - log p_t(y)` of row `r` of [`ZS`] / [`ZT`] in plain f64.
    fn d_ref(r: usize) -> f64 {
        let y = Y[r] as usize;
        logsm(&ZS[r], 1.0)[y] - logsm(&ZT[r], 1.0)[y]
    }

    #[test]
    fn value_is_the_mean_log_ratio_at_the_targets() {
        let (zs, zt) = fixed();
        let want = (d_ref(0) + d_ref(1)) / 2.0;
        // One log-ratio of each sign (0.81 and -0.66): the sign of `d` is what matters.
        assert!(d_ref(0) > 0.5 && d_ref(1) < -0.5, "{} {}", d_ref(0), d_ref(1));
        for fused in [true, false] {
            let (got, _) = run(term(fused).as_ref(), &zs, &zt, &Y, None, None);
            assert!((got - want).abs() < 1e-12, "fused={fused}: {got} vs {want}");
        }
        // With the second token masked out only the first counts.
        let mask = Tensor::new(&[[1f64, 0.0]], &Device::Cpu).expect("mask");
        for fused in [true, false] {
            let (got, _) = run(term(fused).as_ref(), &zs, &zt, &Y, Some(&mask), None);
            assert!(
                (got - d_ref(0)).abs() < 1e-12,
                "masked fused={fused}: {got} vs {}",
                d_ref(0)
            );
        }
    }

    #[test]
    fn a_half_precision_teacher_is_read_in_f32() {
        let (zs, zt) = fixed();
        let zs = zs.to_dtype(DType::F32).expect("f32");
        let zt = zt.to_dtype(DType::BF16).expect("bf16");
        // The reference on the teacher's logits as bf16 holds them.
        let zt_rounded = flat(&zt);
        let want: f64 = (0..2)
            .map(|r| {
                let y = Y[r] as usize;
                let t: [f64; 4] = zt_rounded[4 * r..4 * r + 4].try_into().expect("row");
                logsm(&ZS[r], 1.0)[y] - logsm(&t, 1.0)[y]
            })
            .sum::<f64>()
            / 2.0;
        for fused in [true, false] {
            let (got, _) = run(term(fused).as_ref(), &zs, &zt, &Y, None, None);
            assert!((got - want).abs() < 1e-5, "fused={fused}: {got} vs {want}");
        }
    }

    #[test]
    fn gradient_is_the_score_function_estimator() {
        // d value / d z_s[r, u] = omega_r d_r (1[u = y_r] - p_s[r, u]) / D: not the gradient of
        // the value, which would be omega_r (1[u = y_r] - p_s[r, u]) / D.
        let (zs, zt) = fixed();
        let want = |omega: [f64; 2]| -> Vec<f64> {
            let den = (omega[0] + omega[1]).max(1.0);
            (0..2)
                .flat_map(|r| {
                    let ls = logsm(&ZS[r], 1.0);
                    (0..4).map(move |u| {
                        let onehot = if u == Y[r] as usize { 1.0 } else { 0.0 };
                        omega[r] * d_ref(r) * (onehot - ls[u].exp()) / den
                    })
                })
                .collect()
        };
        let mask = Tensor::new(&[[1f64, 0.0]], &Device::Cpu).expect("mask");
        let tw = Tensor::new(&[[2.5f64, 0.75]], &Device::Cpu).expect("token weights");
        let cases = [
            (None, None, [1.0, 1.0]),
            (Some(&mask), None, [1.0, 0.0]),
            (None, Some(&tw), [2.5, 0.75]),
            (Some(&mask), Some(&tw), [2.5, 0.0]),
        ];
        for fused in [true, false] {
            let term = term(fused);
            for (m, w, omega) in cases {
                let (_, got) = run(term.as_ref(), &zs, &zt, &Y, m, w);
                let want = want(omega);
                assert_eq!(got.len(), want.len());
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() < 1e-12, "fused={fused} omega={omega:?} [{i}]: {g} vs {e}");
                }
            }
        }
    }

    /// Exact `KL(p_s || p_t)` of one row in plain f64.
    fn exact_reverse_kl(zs: &[f64], zt: &[f64]) -> f64 {
        let lse = |z: &[f64]| z.iter().map(|x| x.exp()).sum::<f64>().ln();
        let (ls, lt) = (lse(zs), lse(zt));
        zs.iter()
            .zip(zt)
            .map(|(s, t)| (s - ls).exp() * ((s - ls) - (t - lt)))
            .sum()
    }

    #[test]
    fn expectation_over_the_students_samples_is_the_reverse_kl_and_its_gradient() {
        // One position, V = 6: row y of the batch holds the same logits with target y, weighted
        // by V p_s(y) (sum V > 1, so the weighted token mean is sum_y p_s(y) v_y, the
        // expectation over y ~ p_s).
        const V: usize = 6;
        let zs = [0.3f64, -1.2, 2.1, 0.0, 0.9, -0.4];
        let zt = [1.0f64, 0.4, -0.5, 1.7, 0.2, -2.0];
        let ls = {
            let lse = zs.iter().map(|x| x.exp()).sum::<f64>().ln();
            zs.map(|z| z - lse)
        };
        let rep = |z: &[f64; V]| -> Tensor { Tensor::from_vec(z.repeat(V), (1, V, V), &Device::Cpu).expect("rows") };
        let weights: Vec<f64> = ls.iter().map(|l| V as f64 * l.exp()).collect();
        let weights = Tensor::from_vec(weights, (1, V), &Device::Cpu).expect("weights");
        let y: Vec<u32> = (0..V as u32).collect();
        let want_value = exact_reverse_kl(&zs, &zt);
        let want_grad: Vec<f64> = (0..V)
            .map(|u| {
                let f = |e: f64| {
                    let mut z = zs;
                    z[u] += e;
                    exact_reverse_kl(&z, &zt)
                };
                (f(1e-6) - f(-1e-6)) / 2e-6
            })
            .collect();
        let scale = want_grad.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(scale > 0.05, "a gradient that tells something: {want_grad:?}");
        for fused in [true, false] {
            let (value, g) = run(term(fused).as_ref(), &rep(&zs), &rep(&zt), &y, None, Some(&weights));
            assert!(
                (value - want_value).abs() < 1e-12,
                "fused={fused}: E[d] {value} vs KL {want_value}"
            );
            // Every row is the same logits: their gradient is the sum over the rows.
            for (u, want) in want_grad.iter().enumerate() {
                let got: f64 = (0..V).map(|r| g[r * V + u]).sum();
                assert!(
                    (got - want).abs() < 1e-8,
                    "fused={fused} d/dz[{u}]: E[sg(d) grad lp_s] {got} vs grad KL {want}"
                );
            }
        }
    }

    #[test]
    fn fused_matches_composite_with_weights_and_mask() {
        check_fused_matches_composite(super::build, serde_json::json!({}));
    }

    #[test]
    fn refuses_unknown_params_a_missing_teacher_and_a_vocabulary_mismatch() {
        let err = build_term(super::build, serde_json::json!({ "temperature": 2.0 }))
            .err()
            .expect("temperature is not a param");
        assert!(err.to_string().contains("temperature"), "{err}");
        let term = term(true);
        let (zs, zt) = fixed();
        let targets = Tensor::new(&[Y], &Device::Cpu).expect("targets");
        let batch = Batch {
            input_ids: targets.clone(),
            targets,
            mask: None,
            source: None,
        };
        let s = Outputs::logits_only(zs);
        let narrow = Outputs::logits_only(zt.narrow(2, 0, 3).expect("narrow"));
        let ctx = |teacher| StepContext {
            batch: &batch,
            student: &s,
            teacher,
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let err = term.compute(&ctx(None)).expect_err("no teacher");
        assert!(err.to_string().contains("teacher"), "{err}");
        let err = term.compute(&ctx(Some(&narrow))).expect_err("vocabulary mismatch");
        assert!(err.to_string().contains("differ in shape"), "{err}");
    }
}
