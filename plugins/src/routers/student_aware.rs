//! Router `student_aware`: focuses the logit terms on the tokens where the student lags the
//! teacher, and paces the feature terms by the student's readiness.
//!
//! Each step, before the terms (with `p_s`, `p_t` the student and teacher next-token
//! distributions at temperature 1, over the counted tokens):
//!
//! 1. Gap per token `g_i = KL(p_t || p_s)_i`, mean gap `ḡ`.
//! 2. Token weights `w_i = clamp((g_i / ḡ)^gamma, w_min, w_max)`, rescaled to mean 1. The logit
//!    terms use them as a weighted mean over tokens (`ce` and feature terms are not reweighted).
//! 3. Confidence `c_s = mean_i max_v p_s(v)`, `c_t` likewise; readiness
//!    `r = EMA_decay(min(1, c_s / c_t))` (bias-corrected): how close the student's certainty is
//!    to the teacher's.
//!
//! Then, from the term values `L_j`:
//!
//! 4. `S` = sum of the logit terms' values (terms that read no features); a fast and a slow
//!    bias-corrected EMA of `S` (decays `fast`, `slow`) give the trend
//!    `tau = max(0, (S_slow - S_fast) / S_slow)`, the relative drop still under way.
//! 5. Plateau `pi = clamp(1 - tau / plateau, 0, 1)`: 0 while the logit loss falls by more than
//!    `plateau` between the EMAs, 1 once it has flattened.
//! 6. Pace `rho = r * pi`. Weights: logit terms keep their configured weight; feature terms get
//!    `configured weight * rho` — harder, representation-level terms come in as the student
//!    becomes confident and its logit loss stops falling.
//!
//! Every quantity is logged under `router.` (`gap_mean`, `token_weight_min`,
//! `token_weight_max`, `confidence_student`, `confidence_teacher`, `readiness`, `trend`,
//! `plateau`, `pace`). MoE expert importance (weighting feature terms by the teacher's expert
//! activity) needs a teacher with router taps, which no built-in teacher exposes yet.
//!
//! ```toml
//! [router]
//! kind = "student_aware"
//! gamma = 1.0
//! ```

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{ops, BuildContext, Params, Result, Router, StepContext, TermSignals};

/// Params of `student_aware`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StudentAwareParams {
    /// Exponent of the gap ratio. Default 1.0 (0 turns token weighting off).
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// Smallest token weight before rescaling. Default 0.2.
    #[serde(default = "d_wmin")]
    pub w_min: f64,
    /// Largest token weight before rescaling. Default 5.0.
    #[serde(default = "d_wmax")]
    pub w_max: f64,
    /// EMA decay of the readiness. Default 0.9.
    #[serde(default = "d_decay")]
    pub decay: f64,
    /// Fast EMA decay of the logit loss. Default 0.7.
    #[serde(default = "d_fast")]
    pub fast: f64,
    /// Slow EMA decay of the logit loss. Default 0.95.
    #[serde(default = "d_slow")]
    pub slow: f64,
    /// Relative drop below which the logit loss counts as flat. Default 0.05.
    #[serde(default = "d_plateau")]
    pub plateau: f64,
}

fn d_gamma() -> f64 {
    1.0
}
fn d_wmin() -> f64 {
    0.2
}
fn d_wmax() -> f64 {
    5.0
}
fn d_decay() -> f64 {
    0.9
}
fn d_fast() -> f64 {
    0.7
}
fn d_slow() -> f64 {
    0.95
}
fn d_plateau() -> f64 {
    0.05
}

/// A bias-corrected exponential moving average.
#[derive(Debug, Clone, Copy, serde::Serialize, Deserialize)]
struct Ema {
    decay: f64,
    value: f64,
    n: i32,
}

impl Ema {
    fn new(decay: f64) -> Self {
        Ema {
            decay,
            value: 0.0,
            n: 0,
        }
    }
    fn update(&mut self, x: f64) -> f64 {
        self.n += 1;
        self.value = self.decay * self.value + (1.0 - self.decay) * x;
        self.get()
    }
    fn get(&self) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        self.value / (1.0 - self.decay.powi(self.n))
    }
}

/// The student-aware router.
pub struct StudentAware {
    p: StudentAwareParams,
    readiness: Ema,
    fast: Ema,
    slow: Ema,
    logged: Vec<(String, f64)>,
    step_stats: Vec<(String, f64)>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Router for StudentAware {
    fn prepare(&mut self, ctx: &StepContext) -> Result<Option<Tensor>> {
        let Some(teacher) = ctx.teacher else { return Ok(None) };
        let ls = ops::log_softmax(&ctx.student.logits.detach().to_dtype(DType::F32)?)?;
        let lt = ops::log_softmax(&teacher.logits.to_dtype(DType::F32)?)?;
        let (ps, pt) = (ls.exp()?, lt.exp()?);
        let gap = (&pt * (&lt - &ls)?)?.sum(D::Minus1)?.maximum(0.0)?;
        let mask = match &ctx.batch.mask {
            Some(m) => m.to_dtype(DType::F32)?,
            None => gap.ones_like()?,
        };
        let count = scalar(&mask.sum_all()?)?.max(1.0);
        let mean_gap = (scalar(&(&gap * &mask)?.sum_all()?)? / count).max(1e-12);
        let raw = (gap / mean_gap)?
            .powf(self.p.gamma)?
            .clamp(self.p.w_min, self.p.w_max)?;
        let norm = scalar(&(&raw * &mask)?.sum_all()?)? / count;
        let weights = (raw / norm.max(1e-12))?;
        let masked_mean = |t: &Tensor| -> Result<f64> { Ok(scalar(&(t * &mask)?.sum_all()?)? / count) };
        let c_s = masked_mean(&ps.max(D::Minus1)?)?;
        let c_t = masked_mean(&pt.max(D::Minus1)?)?.max(1e-12);
        let readiness = self.readiness.update((c_s / c_t).min(1.0));
        let (wmin, wmax) = (scalar(&weights.min_all()?)?, scalar(&weights.max_all()?)?);
        self.step_stats = vec![
            ("gap_mean".into(), mean_gap),
            ("token_weight_min".into(), wmin),
            ("token_weight_max".into(), wmax),
            ("confidence_student".into(), c_s),
            ("confidence_teacher".into(), c_t),
            ("readiness".into(), readiness),
        ];
        Ok(Some(weights))
    }

    fn weights(&mut self, s: &TermSignals) -> Result<Vec<f64>> {
        let logit_sum: f64 = s
            .values
            .iter()
            .zip(s.reads_features)
            .filter(|(_, f)| !**f)
            .map(|(v, _)| *v)
            .sum();
        let fast = self.fast.update(logit_sum);
        let slow = self.slow.update(logit_sum);
        let trend = if slow > 0.0 {
            ((slow - fast) / slow).max(0.0)
        } else {
            0.0
        };
        let plateau = (1.0 - trend / self.p.plateau).clamp(0.0, 1.0);
        let pace = self.readiness.get() * plateau;
        self.logged = self.step_stats.clone();
        self.logged.extend([
            ("trend".into(), trend),
            ("plateau".into(), plateau),
            ("pace".into(), pace),
        ]);
        Ok(s.base_weights
            .iter()
            .zip(s.reads_features)
            .map(|(w, f)| if *f { w * pace } else { *w })
            .collect())
    }

    fn scalars(&self) -> Vec<(String, f64)> {
        self.logged.clone()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({"readiness": self.readiness, "fast": self.fast, "slow": self.slow, "step_stats": self.step_stats})
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        #[derive(Deserialize)]
        struct S {
            readiness: Ema,
            fast: Ema,
            slow: Ema,
            step_stats: Vec<(String, f64)>,
        }
        let s: S = serde_json::from_value(state.clone())
            .map_err(|e| retort_core::Error::failed("student_aware router state", e))?;
        (self.readiness, self.fast, self.slow, self.step_stats) = (s.readiness, s.fast, s.slow, s.step_stats);
        Ok(())
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn Router>> {
    let p: StudentAwareParams = params.parse()?;
    if !(p.gamma.is_finite() && p.gamma >= 0.0) {
        return Err(params.error("gamma", format!("expected a number >= 0, got {}", p.gamma)));
    }
    params.require_positive("w_min", p.w_min)?;
    if p.w_max.is_nan() || p.w_max < p.w_min {
        return Err(params.error(
            "w_max",
            format!("expected w_max >= w_min = {}, got {}", p.w_min, p.w_max),
        ));
    }
    for (key, v) in [("decay", p.decay), ("fast", p.fast), ("slow", p.slow)] {
        if !(0.0..1.0).contains(&v) {
            return Err(params.error(key, format!("expected a number in [0, 1), got {v}")));
        }
    }
    if p.fast >= p.slow {
        return Err(params.error("fast", format!("expected fast < slow = {}, got {}", p.slow, p.fast)));
    }
    params.require_positive("plateau", p.plateau)?;
    Ok(Box::new(StudentAware {
        readiness: Ema::new(p.decay),
        fast: Ema::new(p.fast),
        slow: Ema::new(p.slow),
        p,
        logged: Vec::new(),
        step_stats: Vec::new(),
    }))
}

inventory::submit! {
    Factory::<dyn Router> {
        kind: "student_aware",
        description: "weights KD tokens by the teacher-student gap; paces feature terms by student readiness",
        build, params: retort_core::registry::params_schema::<StudentAwareParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use retort_core::{Batch, Outputs, Progress, Registry};

    fn router() -> Box<dyn Router> {
        let r = Registry::empty();
        let ctx = BuildContext::new(&r, Device::Cpu, 0);
        build(&Params::empty("router"), &ctx).expect("build")
    }

    #[test]
    fn token_weights_follow_the_gap_and_average_one() {
        let mut r = router();
        let dev = Device::Cpu;
        // Token 0: student equals teacher (gap 0); token 1: student far off.
        let zt = Tensor::new(&[[[2.0f32, 0.0, 0.0], [2.0, 0.0, 0.0]]], &dev).expect("zt");
        let zs = Tensor::new(&[[[2.0f32, 0.0, 0.0], [0.0, 2.0, 0.0]]], &dev).expect("zs");
        let ids = Tensor::zeros((1, 2), DType::U32, &dev).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let (s, t) = (Outputs::logits_only(zs), Outputs::logits_only(zt));
        let ctx = StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&t),
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let w: Vec<f32> = r
            .prepare(&ctx)
            .expect("prepare")
            .expect("weights")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        // Raw: gap ratios 0 and 2 -> clamped 0.2 and 2.0; mean 1.1 -> 0.1818.., 1.8181...
        assert!(
            (w[0] - 0.2 / 1.1).abs() < 1e-5 && (w[1] - 2.0 / 1.1).abs() < 1e-5,
            "{w:?}"
        );
        assert!(((w[0] + w[1]) / 2.0 - 1.0).abs() < 1e-6);
        // Student confidence: token 0 equals the teacher's, token 1 the same max prob -> 1.
        let logged = {
            let names = vec!["kl".to_string(), "hidden".to_string()];
            r.weights(&TermSignals {
                names: &names,
                values: &[1.0, 5.0],
                base_weights: &[0.5, 0.2],
                reads_features: &[false, true],
                progress: Progress::new(0, 1),
            })
            .expect("w");
            r.scalars()
        };
        let get = |k: &str| logged.iter().find(|(n, _)| n == k).map(|(_, v)| *v).expect(k);
        assert!((get("readiness") - 1.0).abs() < 1e-6);
        // First step: both EMAs equal the value, no trend, plateau 1, pace = readiness.
        assert!(get("trend").abs() < 1e-12 && (get("pace") - 1.0).abs() < 1e-6);
    }

    #[test]
    fn feature_terms_wait_while_the_logit_loss_falls() {
        let mut r = router();
        let names = vec!["kl".to_string(), "hidden".to_string()];
        let mut w = Vec::new();
        for step in 0..10 {
            // Logit loss halving every step: a steep trend keeps the feature term off.
            let v = 8.0 * 0.5f64.powi(step);
            w = r
                .weights(&TermSignals {
                    names: &names,
                    values: &[v, 3.0],
                    base_weights: &[0.5, 0.2],
                    reads_features: &[false, true],
                    progress: Progress::new(step as usize, 10),
                })
                .expect("w");
        }
        assert_eq!(w[0], 0.5);
        assert_eq!(w[1], 0.0, "{:?}", r.scalars());
        for step in 10..260 {
            w = r
                .weights(&TermSignals {
                    names: &names,
                    values: &[0.015, 3.0],
                    base_weights: &[0.5, 0.2],
                    reads_features: &[false, true],
                    progress: Progress::new(step, 260),
                })
                .expect("w");
        }
        // Flat logit loss: the plateau indicator rises to 1; the pace stays 0 here because
        // readiness is 0 without prepare() (no teacher outputs seen).
        let plateau = r
            .scalars()
            .iter()
            .find(|(k, _)| k == "plateau")
            .map(|(_, v)| *v)
            .expect("plateau");
        assert!(plateau > 0.99, "{plateau}");
        assert_eq!(w[1], 0.0);
    }
}
