//! `confidence_kl`: forward KL weighted per token by the teacher's confidence, as a plugin.
//!
//! With `p_t`, `p_s` at temperature `T` over a vocabulary of `V` and the teacher's normalised
//! entropy `h = H(p_t) / ln V`, each token's KL is weighted by `c = 1 - h` (a confident teacher
//! counts fully, a uniform one not at all), and the weights are normalised over the batch:
//! `L = T^2 * sum_i w_i c_i KL(p_t || p_s)_i / sum_i w_i c_i`, where `w_i` is the padding mask
//! times the router's token weights (the weights of [`StepContext::token_mean`]). It follows the idea of weighting soft
//! labels by how informative they are (Zhou et al. 2021, "Rethinking Soft Labels for Knowledge
//! Distillation: A Bias-Variance Tradeoff Perspective").
//!
//! ```toml
//! [plugins]
//! paths = ["target/release/libretort_plugin_loss.so"]
//!
//! [[loss]]
//! kind = "confidence_kl"
//! temperature = 2.0
//! ```

use retort_sdk::prelude::*;
use serde::Deserialize;

/// Params of `confidence_kl`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ConfidenceKlParams {
    /// Temperature `T > 0`. Default 1.0.
    #[serde(default = "one")]
    temperature: f64,
}

fn one() -> f64 {
    1.0
}

/// The loss term.
pub struct ConfidenceKl {
    temperature: f64,
}

impl LossTerm for ConfidenceKl {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("confidence_kl needs a teacher".into()))?;
        let t = self.temperature;
        let ls = ops::log_softmax(&(ctx.student.logits.to_dtype(DType::F32)? / t)?)?;
        let lt = ops::log_softmax(&(teacher.logits.to_dtype(DType::F32)? / t)?)?;
        let pt = lt.exp()?;
        let kl = (&pt * (&lt - &ls)?)?.sum(D::Minus1)?;
        let vocab = pt.dim(D::Minus1)? as f64;
        let entropy = (&pt * &lt)?.sum(D::Minus1)?.neg()?;
        let confidence = (entropy / vocab.ln())?.affine(-1.0, 1.0)?.detach();
        // token_mean(c KL) / token_mean(c) = sum_i w_i c_i KL_i / sum_i w_i c_i.
        let weighted = ctx.token_mean(&(kl * &confidence)?)?;
        let norm = ctx.token_mean(&confidence)?.maximum(1e-12)?;
        Ok((weighted.div(&norm)? * (t * t))?)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: ConfidenceKlParams = params.parse()?;
    params.require_positive("temperature", p.temperature)?;
    Ok(Box::new(ConfidenceKl {
        temperature: p.temperature,
    }))
}

/// Registers the plugin's kinds.
pub fn register(r: &mut dyn Registrar) {
    r.loss(Factory {
        kind: "confidence_kl",
        description: "forward KL weighted per token by the teacher's confidence 1 - H(p_t)/ln V (plugin)",
        build,
        params: retort_sdk::registry::params_schema::<ConfidenceKlParams>,
    });
}

retort_sdk::export_plugin!(register);

#[cfg(test)]
mod tests {
    use super::*;
    use retort_sdk::Registry;

    #[test]
    fn uniform_teacher_tokens_do_not_count() {
        let dev = Device::Cpu;
        // Token 0: confident teacher; token 1: uniform teacher (confidence 0).
        let zt = Tensor::new(&[[[4.0f32, 0.0, 0.0], [1.0, 1.0, 1.0]]], &dev).expect("zt");
        let zs = Tensor::new(&[[[0.0f32, 1.0, 0.0], [3.0, 0.0, 0.0]]], &dev).expect("zs");
        let ids = Tensor::zeros((1, 2), DType::U32, &dev).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let (s, t) = (Outputs::logits_only(zs.clone()), Outputs::logits_only(zt.clone()));
        let ctx = StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&t),
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let reg = Registry::empty();
        let term = build(&Params::empty("loss[0]"), &BuildContext::new(&reg, dev.clone(), 0)).expect("build");
        let got = term.compute(&ctx).expect("compute").to_scalar::<f32>().expect("s");
        // Reference: only token 0 counts: KL(softmax([4,0,0]) || softmax([0,1,0])).
        let sm = |z: [f64; 3]| {
            let s: f64 = z.iter().map(|x| x.exp()).sum();
            z.map(|x| x.exp() / s)
        };
        let (p, q) = (sm([4.0, 0.0, 0.0]), sm([0.0, 1.0, 0.0]));
        let want: f64 = (0..3).map(|i| p[i] * (p[i] / q[i]).ln()).sum();
        assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
    }
}
