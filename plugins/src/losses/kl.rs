//! `kl`: forward KL divergence from the teacher to the student at temperature `T`
//! (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network").
//!
//! `L = T^2 * mean_tokens sum_v p_t(v) * (log p_t(v) - log p_s(v))`, with
//! `p_t = softmax(z_t / T)`, `p_s = softmax(z_s / T)`. The `T^2` factor keeps the gradient scale
//! independent of `T`; `scale_by_t2 = false` turns it off.
//!
//! ```toml
//! [[loss]]
//! kind = "kl"
//! weight = 0.5
//! temperature = 2.0
//! ```

use candle_core::{Tensor, D};
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, LossTerm, Params, Result, StepContext};

use super::{as_float, check_same_shape, masked_mean};
use crate::models::nn::log_softmax_last;

/// Params of `kl`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlParams {
    /// Softmax temperature `T > 0`. Default 1.0.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Multiply by `T^2`. Default true.
    #[serde(default = "yes")]
    pub scale_by_t2: bool,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// Forward KL(teacher || student) at temperature `T`.
pub struct ForwardKl {
    temperature: f64,
    scale_by_t2: bool,
}

/// Per-token `sum_v p_t (log p_t - log p_s)` at temperature `t`, shape `[b, s]`.
pub fn kl_per_token(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor> {
    check_same_shape(student, teacher)?;
    let ls = log_softmax_last(&(as_float(student)? / t)?)?;
    let lt = log_softmax_last(&(as_float(teacher)?.to_dtype(ls.dtype())? / t)?)?;
    Ok((lt.exp()? * (lt - ls)?)?.sum(D::Minus1)?)
}

impl LossTerm for ForwardKl {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("kl needs teacher outputs".into()))?;
        let per_token = kl_per_token(&ctx.student.logits, &teacher.logits, self.temperature)?;
        let mean = masked_mean(&per_token, ctx.batch.mask.as_ref())?;
        let scale = if self.scale_by_t2 {
            self.temperature * self.temperature
        } else {
            1.0
        };
        Ok((mean * scale)?)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
}

fn build(params: &Params, _ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: KlParams = params.parse()?;
    params.require_positive("temperature", p.temperature)?;
    Ok(Box::new(ForwardKl {
        temperature: p.temperature,
        scale_by_t2: p.scale_by_t2,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "kl",
        description: "forward KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al. 2015)",
        build,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use retort_core::{Batch, Outputs, Progress};

    const ZS: [[f64; 4]; 2] = [[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, -2.0, 0.3]];
    const ZT: [[f64; 4]; 2] = [[1.5, 0.0, 1.0, -1.0], [0.0, 2.0, -1.0, 0.0]];

    /// Reference in plain f64: T^2 * mean_rows sum_v p_t (log p_t - log p_s), p = softmax(z/T).
    fn reference(t: f64) -> f64 {
        let logsm = |z: &[f64; 4]| -> Vec<f64> {
            let lse = z.iter().map(|x| (x / t).exp()).sum::<f64>().ln();
            z.iter().map(|x| x / t - lse).collect()
        };
        let mut total = 0.0;
        for r in 0..2 {
            let (ls, lt) = (logsm(&ZS[r]), logsm(&ZT[r]));
            total += (0..4).map(|v| lt[v].exp() * (lt[v] - ls[v])).sum::<f64>();
        }
        t * t * total / 2.0
    }

    fn ctx_value(zs: &Tensor, t: f64) -> Tensor {
        let zt = Tensor::new(&[ZT], &Device::Cpu).expect("zt");
        let ids = Tensor::zeros((1, 2), candle_core::DType::U32, &Device::Cpu).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
        };
        let (s, te) = (Outputs::logits_only(zs.clone()), Outputs::logits_only(zt));
        let ctx = StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&te),
            progress: Progress::new(0, 1),
        };
        ForwardKl {
            temperature: t,
            scale_by_t2: true,
        }
        .compute(&ctx)
        .expect("kl")
    }

    #[test]
    fn matches_reference_values_at_several_temperatures() {
        let zs = Tensor::new(&[ZS], &Device::Cpu).expect("zs");
        for t in [0.5, 1.0, 2.0, 4.0] {
            let got = ctx_value(&zs, t).to_scalar::<f64>().expect("s");
            assert!((got - reference(t)).abs() < 1e-12, "T={t}: {got} vs {}", reference(t));
        }
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
    fn gradient_matches_finite_difference() {
        let zs = Var::new(&[ZS], &Device::Cpu).expect("v");
        let g = ctx_value(zs.as_tensor(), 2.0).backward().expect("b");
        let g: Vec<f64> = g
            .get(zs.as_tensor())
            .expect("g")
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
                ctx_value(&t, 2.0).to_scalar::<f64>().expect("s")
            };
            let num = (f(1e-6) - f(-1e-6)) / 2e-6;
            assert!((num - g[i]).abs() < 1e-7, "{i}: {num} vs {}", g[i]);
        }
    }

    #[test]
    fn rejects_non_positive_temperature() {
        let r = retort_core::Registry::empty();
        let ctx = BuildContext::new(&r, Device::Cpu, 0);
        for t in [0.0, -1.0] {
            let p = Params::new(
                "loss[0]",
                serde_json::json!({"temperature": t}).as_object().expect("o").clone(),
            );
            let err = build(&p, &ctx).err().expect("err");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("loss[0].temperature"), "{err}");
        }
    }
}
