//! Loss terms and the step context they read.
//!
//! Weight convention (used everywhere in retort): the training objective is
//! `total = sum_i weight_i * term_i`, with the weights from the router (the static router uses
//! the configured `weight` of each term, default 1.0). Weights are not normalised. Logit KD
//! terms at temperature `T` include the `T^2` factor themselves (Hinton et al., 2015), so the
//! classic `alpha * CE + (1 - alpha) * T^2 * KL` is written as weights `alpha` and `1 - alpha`.

use candle_core::{Tensor, Var};

use crate::{ops, Batch, Outputs, Progress, Result};

/// Everything a term may read during one step.
pub struct StepContext<'a> {
    /// The batch.
    pub batch: &'a Batch,
    /// Student outputs (logits and requested taps), attached to the autograd graph.
    pub student: &'a Outputs,
    /// Teacher outputs, detached; `None` when no term of the pipeline needs a teacher.
    pub teacher: Option<&'a Outputs>,
    /// Training progress.
    pub progress: Progress,
    /// Per-token weights `[batch, seq]` from the router (mean 1 over counted tokens), applied by
    /// the logit distillation terms on top of the mask; `None` means uniform.
    pub token_weights: Option<&'a Tensor>,
}

impl StepContext<'_> {
    /// Mean of per-token values `v [batch, seq]` over the tokens that count, weighted by the
    /// padding mask `m` and the router's token weights `r`:
    /// `sum_i w_i v_i / max(sum_i w_i, 1)` with `w = r * m` (either factor is 1 when absent),
    /// or `mean_i v_i` when both are absent (see [`ops::masked_mean`]).
    ///
    /// This is the reduction of the logit distillation terms (before their `T^2` factor); a
    /// plugin term that reduces with it honours padding and token-weighting routers.
    pub fn token_mean(&self, per_token: &Tensor) -> Result<Tensor> {
        let dtype = per_token.dtype();
        let weights = match (self.token_weights, self.batch.mask.as_ref()) {
            (Some(r), Some(m)) => Some((r.to_dtype(dtype)? * m.to_dtype(dtype)?)?),
            (Some(r), None) => Some(r.clone()),
            (None, m) => m.cloned(),
        };
        Ok(ops::masked_mean(per_token, weights.as_ref())?)
    }

    /// `scale * token_mean(v)`: a term's value from its [`LossTerm::per_token`] form `(v, scale)`.
    pub fn scaled_token_mean(&self, (per_token, scale): (Tensor, f64)) -> Result<Tensor> {
        let mean = self.token_mean(&per_token)?;
        Ok(if scale == 1.0 { mean } else { (mean * scale)? })
    }
}

/// One term of the training objective.
pub trait LossTerm: Send + Sync {
    /// Computes the term as a scalar tensor (rank 0), differentiable w.r.t. the student.
    fn compute(&self, ctx: &StepContext) -> Result<Tensor>;
    /// Whether the term reads teacher outputs.
    fn needs_teacher(&self) -> bool;
    /// Whether the term reads the teacher's dense logits (a teacher with only a sparse top-k,
    /// see [`crate::Teacher::sparse_topk`], is refused for such a term). Default:
    /// [`LossTerm::needs_teacher`].
    fn needs_teacher_logits(&self) -> bool {
        self.needs_teacher()
    }
    /// Student taps the term reads (besides logits).
    fn student_taps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Teacher taps the term reads (besides logits).
    fn teacher_taps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Trainable parameters the term owns (e.g. projections between widths). They are
    /// optimised with the student and are not part of the exported student.
    fn vars(&self) -> Vec<(String, Var)> {
        Vec::new()
    }
    /// Whether the term is `scale * ctx.token_mean(v)` (or `scale * masked_mean(v, mask)`, see
    /// [`LossTerm::router_token_weighted`]) with `v [batch, seq]` a function of each
    /// token's own student logits, teacher outputs and target (the logit terms), computed by
    /// [`LossTerm::per_token`]. Such terms can run fused with the student's output head, on
    /// chunks of tokens, without the full logits ever existing (`kernels::lm_head`). Default
    /// false.
    fn per_token_form(&self) -> bool {
        false
    }
    /// Whether the term's token mean weighs tokens by the router's token weights as well as by
    /// the padding mask (`StepContext::token_mean`: the distillation terms), or by the mask
    /// only (`ce`: `ops::masked_mean(v, mask)`). Read with [`LossTerm::per_token`]. Default true.
    fn router_token_weighted(&self) -> bool {
        true
    }
    /// `(v, scale)` with `v [batch, seq]` the term's per-token values (differentiable w.r.t. the
    /// student logits) and `scale` the factor after the token mean (e.g. `T^2`), so that
    /// [`LossTerm::compute`] is `scale * ctx.token_mean(v)`. Only called when
    /// [`LossTerm::per_token_form`] is true; `ctx.batch.mask` and `ctx.token_weights` are then
    /// `None` (the caller weighs the tokens, see [`LossTerm::router_token_weighted`]).
    fn per_token(&self, _ctx: &StepContext) -> Result<(Tensor, f64)> {
        Err(crate::Error::Runtime(
            "this loss term has no per-token form (per_token_form is false)".into(),
        ))
    }
    /// Whether the term's estimator assumes that the batch's targets were sampled from the
    /// student itself (an on-policy term such as `sampled_reverse_kl`): the run then refuses it
    /// unless every step trains on the student's samples (`[on_policy]` with `lambda = 1` and
    /// `seq_kd = false`). Default false.
    fn needs_student_samples(&self) -> bool {
        false
    }
    /// Whether the term's weight may be negative (a term meant to be maximised). Otherwise its
    /// weight, a number or a schedule, must be >= 0 over all of training. Default false.
    fn signed_weights(&self) -> bool {
        false
    }
    /// Effective values of the term's scheduled parameters at `progress` (e.g.
    /// `("temperature", 2.4)`), logged in the metrics every logged step.
    fn scalars(&self, _progress: Progress) -> Vec<(String, f64)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn token_mean_weights_by_mask_and_router_weights() {
        let dev = Device::Cpu;
        let v = Tensor::new(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).expect("v");
        let mask = Tensor::new(&[[1.0f32, 1.0, 0.0], [1.0, 0.0, 0.0]], &dev).expect("mask");
        let r = Tensor::new(&[[2.0f32, 0.5, 9.0], [0.5, 9.0, 9.0]], &dev).expect("r");
        let ids = Tensor::zeros((2, 3), DType::U32, &dev).expect("ids");
        let outputs = Outputs::logits_only(Tensor::zeros((2, 3, 1), DType::F32, &dev).expect("z"));
        let mean = |mask: Option<&Tensor>, r: Option<&Tensor>| {
            let batch = Batch {
                input_ids: ids.clone(),
                targets: ids.clone(),
                mask: mask.cloned(),
                source: None,
            };
            let ctx = StepContext {
                batch: &batch,
                student: &outputs,
                teacher: None,
                progress: Progress::new(0, 1),
                token_weights: r,
            };
            ctx.token_mean(&v).expect("mean").to_scalar::<f32>().expect("s")
        };
        assert_eq!(mean(None, None), 3.5);
        // (1 + 2 + 4) / 3
        assert_eq!(mean(Some(&mask), None), 7.0 / 3.0);
        // (2 * 1 + 0.5 * 2 + 0.5 * 4) / (2 + 0.5 + 0.5)
        assert_eq!(mean(Some(&mask), Some(&r)), 5.0 / 3.0);
        // sum(r v) / sum(r)
        assert_eq!(mean(None, Some(&r)), 131.0 / 30.0);
    }
}
