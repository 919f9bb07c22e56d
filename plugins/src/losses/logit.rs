//! What the logit-distillation terms share: temperature handling (a number or a schedule),
//! the optional `T^2` factor, and tempered log-probabilities of student and teacher.

use candle_core::Tensor;
use serde::Deserialize;

use retort_core::{BuildContext, Error, LossTerm, Params, Progress, Result, Scalar, ScalarSpec, StepContext};

use super::{as_float, check_same_shape};
use crate::kernels::divergence::{self, Divergence as FusedKind};

/// Temperature and `T^2` scaling of one logit term.
pub struct Tempered {
    temperature: Scalar,
    scale_by_t2: bool,
}

impl Tempered {
    /// Builds from a term's `temperature` and `scale_by_t2` params.
    pub fn new(params: &Params, ctx: &BuildContext, temperature: &ScalarSpec, scale_by_t2: bool) -> Result<Self> {
        Ok(Tempered {
            temperature: temperature.build_temperature(&params.key_path("temperature"), ctx)?,
            scale_by_t2,
        })
    }

    /// `T` at `progress`.
    pub fn temperature(&self, progress: Progress) -> f64 {
        self.temperature.at(progress)
    }

    /// The teacher's logits, or an error if the step has no teacher outputs.
    pub fn teacher_logits<'a>(&self, ctx: &'a StepContext) -> Result<&'a Tensor> {
        Ok(&ctx
            .teacher
            .ok_or_else(|| Error::Runtime("a logit distillation term needs teacher outputs".into()))?
            .logits)
    }

    /// Per-token divergence `[b, s]` at the step's temperature by the divergence op
    /// (`kernels::divergence`: the fused kernel where it runs, its composite elsewhere).
    pub fn fused(&self, ctx: &StepContext, kind: FusedKind) -> Result<(Tensor, f64)> {
        let zs = as_float(&ctx.student.logits)?;
        let zt = as_float(self.teacher_logits(ctx)?)?;
        check_same_shape(&zs, &zt)?;
        let t = self.temperature(ctx.progress);
        Ok((divergence::per_token(&zs, &zt, t, kind)?, t))
    }

    /// Per-token divergence `[b, s]` at the step's temperature: the divergence op ([`Self::fused`])
    /// when `fused`, else its composite from [`Self::log_probs`] (the reference, `fused = false`).
    pub fn per_token(&self, ctx: &StepContext, kind: FusedKind, fused: bool) -> Result<(Tensor, f64)> {
        if fused {
            return self.fused(ctx, kind);
        }
        let (ls, lt, t) = self.log_probs(ctx)?;
        Ok((divergence::composite::from_log_probs(&ls, &lt, kind)?, t))
    }

    /// Student and teacher log-probabilities at the step's temperature, `[b, s, v]` each.
    pub fn log_probs(&self, ctx: &StepContext) -> Result<(Tensor, Tensor, f64)> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("a logit distillation term needs teacher outputs".into()))?;
        let t = self.temperature(ctx.progress);
        let (ls, lt) = tempered_log_probs(&ctx.student.logits, &teacher.logits, t)?;
        Ok((ls, lt, t))
    }

    /// The factor after the token mean at temperature `t`: `T^2` when scaling is on, else 1.
    pub fn scale(&self, t: f64) -> f64 {
        if self.scale_by_t2 {
            t * t
        } else {
            1.0
        }
    }

    /// `[("temperature", T)]` for the metrics.
    pub fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        vec![("temperature".into(), self.temperature(progress))]
    }
}

/// Per-token divergence from tempered log-probabilities `(log p_s, log p_t)`, `[.., v] -> [..]`.
pub type Divergence = fn(&Tensor, &Tensor) -> Result<Tensor>;

/// A logit term that is a per-token divergence of the tempered distributions, reduced by
/// [`Tempered::reduce`] (the shape of `kl`, `reverse_kl` and `tvd`).
pub struct DivergenceTerm {
    tempered: Tempered,
    divergence: Divergence,
    /// The fused kernel computing the same divergence, if there is one and it is enabled.
    fused: Option<FusedKind>,
}

impl DivergenceTerm {
    /// Builds from `temperature` / `scale_by_t2` params with the term's default for the latter
    /// (a term without a fused kernel).
    pub fn build(params: &Params, ctx: &BuildContext, divergence: Divergence, t2_default: bool) -> Result<Self> {
        let p: TemperatureParams = params.parse()?;
        Ok(DivergenceTerm {
            tempered: Tempered::new(params, ctx, &p.temperature, p.scale_by_t2.unwrap_or(t2_default))?,
            divergence,
            fused: None,
        })
    }

    /// Builds from [`FusableParams`]: the divergence op `kind` computes the step unless
    /// `fused = false`, then `divergence`, the composite reference, does.
    pub fn build_fusable(
        params: &Params,
        ctx: &BuildContext,
        divergence: Divergence,
        kind: FusedKind,
        t2_default: bool,
    ) -> Result<Self> {
        let p: FusableParams = params.parse()?;
        Ok(DivergenceTerm {
            tempered: Tempered::new(params, ctx, &p.temperature, p.scale_by_t2.unwrap_or(t2_default))?,
            divergence,
            fused: p.fused.then_some(kind),
        })
    }
}

impl LossTerm for DivergenceTerm {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        let (per_token, t) = match self.fused {
            Some(kind) => self.tempered.fused(ctx, kind)?,
            None => {
                let (ls, lt, t) = self.tempered.log_probs(ctx)?;
                ((self.divergence)(&ls, &lt)?, t)
            }
        };
        Ok((per_token, self.tempered.scale(t)))
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        self.tempered.scalars(progress)
    }
}

/// `(log softmax(z_s / t), log softmax(z_t / t))`, both at least f32.
pub fn tempered_log_probs(student: &Tensor, teacher: &Tensor, t: f64) -> Result<(Tensor, Tensor)> {
    check_same_shape(student, teacher)?;
    Ok(divergence::composite::log_probs(
        &as_float(student)?,
        &as_float(teacher)?,
        t,
    )?)
}

/// `temperature` and `scale_by_t2` as most logit terms take them.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemperatureParams {
    /// Softmax temperature `T` in [0.001, 1000]: a number or a schedule. Default 1.0.
    #[serde(default = "one")]
    pub temperature: ScalarSpec,
    /// Multiply by `T^2`; the default depends on the term.
    pub scale_by_t2: Option<bool>,
}

/// `temperature`, `scale_by_t2` and `fused`, as the terms with a fused kernel take them.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FusableParams {
    /// Softmax temperature `T` in [0.001, 1000]: a number or a schedule. Default 1.0.
    #[serde(default = "one")]
    pub temperature: ScalarSpec,
    /// Multiply by `T^2`; the default depends on the term.
    pub scale_by_t2: Option<bool>,
    /// Use the fused single-pass CPU kernel (default true); `false` composes candle ops (the
    /// reference implementation; also what runs off the CPU).
    #[serde(default = "yes")]
    pub fused: bool,
}

/// `true`, as a serde default.
pub fn yes() -> bool {
    true
}

/// Default temperature.
pub fn one() -> ScalarSpec {
    ScalarSpec::Number(1.0)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Fixed inputs, plain-f64 references and a finite-difference check shared by the tests of
    //! the logit terms.
    use candle_core::{DType, Device, Tensor, Var};
    use retort_core::{Batch, BuildContext, LossTerm, Outputs, Params, Progress, Registry, Result, StepContext};

    /// Student logits, 2 tokens x 4 classes.
    pub const ZS: [[f64; 4]; 2] = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.3]];
    /// Teacher logits.
    pub const ZT: [[f64; 4]; 2] = [[1.5, 0.0, 1.0, -1.0], [0.0, 2.0, -1.0, 0.0]];

    /// Reference `log softmax(z / t)` in plain f64.
    pub fn logsm(z: &[f64; 4], t: f64) -> [f64; 4] {
        let lse = z.iter().map(|x| (x / t).exp()).sum::<f64>().ln();
        [z[0] / t - lse, z[1] / t - lse, z[2] / t - lse, z[3] / t - lse]
    }

    /// Mean over the two rows of `f(log p_s, log p_t)` in plain f64.
    pub fn reference(t: f64, f: impl Fn(&[f64; 4], &[f64; 4]) -> f64) -> f64 {
        (0..2).map(|r| f(&logsm(&ZS[r], t), &logsm(&ZT[r], t))).sum::<f64>() / 2.0
    }

    /// A term built from JSON params with the built-in schedules registered.
    pub fn build_term(
        factory: fn(&Params, &BuildContext) -> Result<Box<dyn LossTerm>>,
        params: serde_json::Value,
    ) -> Result<Box<dyn LossTerm>> {
        let mut reg = Registry::empty();
        for f in inventory::iter::<retort_core::registry::Factory<dyn retort_core::Schedule>> {
            reg.schedules.register(f, "built-in")?;
        }
        let ctx = BuildContext::new(&reg, Device::Cpu, 0);
        factory(
            &Params::new("loss[0]", params.as_object().expect("object").clone()),
            &ctx,
        )
    }

    /// The term's value on student logits `zs` against [`ZT`].
    pub fn value(term: &dyn LossTerm, zs: &Tensor, progress: Progress) -> Tensor {
        let zt = Tensor::new(&[ZT], &Device::Cpu).expect("zt");
        let ids = Tensor::zeros((1, 2), DType::U32, &Device::Cpu).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let (s, te) = (Outputs::logits_only(zs.clone()), Outputs::logits_only(zt));
        let ctx = StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&te),
            progress,
            token_weights: None,
        };
        term.compute(&ctx).expect("compute")
    }

    /// Asserts the analytic gradient w.r.t. the student logits matches central differences.
    pub fn check_gradient(term: &dyn LossTerm) {
        let p = Progress::new(0, 1);
        let zs = Var::new(&[ZS], &Device::Cpu).expect("var");
        let grads = value(term, zs.as_tensor(), p).backward().expect("backward");
        let g: Vec<f64> = grads
            .get(zs.as_tensor())
            .expect("grad")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let base: Vec<f64> = ZS.iter().flatten().copied().collect();
        for i in 0..base.len() {
            let f = |d: f64| {
                let mut w = base.clone();
                w[i] += d;
                let t = Tensor::from_vec(w, (1, 2, 4), &Device::Cpu).expect("t");
                value(term, &t, p).to_scalar::<f64>().expect("s")
            };
            let num = (f(1e-6) - f(-1e-6)) / 2e-6;
            assert!(
                (num - g[i]).abs() < 1e-6,
                "d/dz[{i}]: numeric {num} vs analytic {}",
                g[i]
            );
        }
    }

    /// Builds the term from `params` twice, with `fused = true` and `fused = false`, and asserts
    /// that on random logits `[2, 5, 300]` (f64 and f32), with a padding mask and router token
    /// weights, value and gradient w.r.t. the student logits agree within 1e-5 relative
    /// (1e-10 in f64). The teacher has dense logits and the `topk.16` tap.
    pub fn check_fused_matches_composite(
        factory: fn(&Params, &BuildContext) -> Result<Box<dyn LossTerm>>,
        params: serde_json::Value,
    ) {
        use rand::{Rng, SeedableRng};
        let dev = Device::Cpu;
        let (b, s, v) = (2, 5, 300);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        let mut draw = |n: usize| -> Vec<f64> { (0..n).map(|_| rng.random_range(-4.0..4.0)).collect() };
        let zs = Tensor::from_vec(draw(b * s * v), (b, s, v), &dev).expect("zs");
        let zt = Tensor::from_vec(draw(b * s * v), (b, s, v), &dev).expect("zt");
        let tw = Tensor::from_vec(draw(b * s), (b, s), &dev)
            .and_then(|w| w.abs())
            .expect("w");
        let mask = Tensor::new(&[[1f64, 1., 1., 0., 1.], [1., 0., 1., 1., 1.]], &dev).expect("mask");
        let targets: Vec<u32> = (0..b * s).map(|i| ((i * 37) % v) as u32).collect();
        let targets = Tensor::from_vec(targets, (b, s), &dev).expect("targets");
        let with = |fused: bool| {
            let mut p = params.as_object().expect("object").clone();
            p.insert("fused".into(), fused.into());
            build_term(factory, serde_json::Value::Object(p)).expect("build")
        };
        let (fused, composite) = (with(true), with(false));
        for dtype in [DType::F64, DType::F32] {
            let run = |term: &dyn LossTerm| -> (f64, Vec<f64>) {
                let var = Var::from_tensor(&zs.to_dtype(dtype).expect("d")).expect("var");
                let zt = zt.to_dtype(dtype).expect("d");
                let (ids, lp) = retort_core::model::dense_topk(&zt, 16).expect("topk");
                let mut te = Outputs::logits_only(zt);
                te.taps.insert("topk.16.ids".into(), ids);
                te.taps.insert("topk.16.logprobs".into(), lp);
                let batch = Batch {
                    input_ids: targets.clone(),
                    targets: targets.clone(),
                    mask: Some(mask.to_dtype(dtype).expect("d")),
                    source: None,
                };
                let st = Outputs::logits_only(var.as_tensor().clone());
                let tw = tw.to_dtype(dtype).expect("d");
                let ctx = StepContext {
                    batch: &batch,
                    student: &st,
                    teacher: Some(&te),
                    progress: Progress::new(0, 1),
                    token_weights: Some(&tw),
                };
                let loss = term.compute(&ctx).expect("compute");
                let g = loss.backward().expect("backward");
                let g = g.get(var.as_tensor()).expect("student gradient");
                let f = |t: &Tensor| -> Vec<f64> {
                    t.to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1())
                        .expect("vec")
                };
                (f(&loss)[0], f(g))
            };
            let ((fv, fg), (cv, cg)) = (run(fused.as_ref()), run(composite.as_ref()));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            assert!(
                (fv - cv).abs() <= tol * cv.abs().max(1e-12),
                "{params} {dtype:?}: fused {fv} vs composite {cv}"
            );
            let scale = cg.iter().fold(0f64, |m, x| m.max(x.abs()));
            assert!(scale > 0.0, "{params}: zero gradient");
            for (i, (a, c)) in fg.iter().zip(&cg).enumerate() {
                assert!(
                    (a - c).abs() <= tol * scale,
                    "{params} {dtype:?} grad[{i}]: fused {a} vs composite {c}"
                );
            }
        }
    }

    /// The term's value on [`ZS`].
    pub fn value_at(term: &dyn LossTerm, progress: Progress) -> f64 {
        let zs = Tensor::new(&[ZS], &Device::Cpu).expect("zs");
        value(term, &zs, progress).to_scalar::<f64>().expect("scalar")
    }
}
