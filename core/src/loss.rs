//! Loss terms and the step context they read.
//!
//! Weight convention (used everywhere in retort): the training objective is
//! `total = sum_i weight_i * term_i`, with the weights from the router (the static router uses
//! the configured `weight` of each term, default 1.0). Weights are not normalised. Logit KD
//! terms at temperature `T` include the `T^2` factor themselves (Hinton et al., 2015), so the
//! classic `alpha * CE + (1 - alpha) * T^2 * KL` is written as weights `alpha` and `1 - alpha`.

use candle_core::{Tensor, Var};

use crate::{Batch, Outputs, Progress, Result};

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
    /// Effective values of the term's scheduled parameters at `progress` (e.g.
    /// `("temperature", 2.4)`), logged in the metrics every logged step.
    fn scalars(&self, _progress: Progress) -> Vec<(String, f64)> {
        Vec::new()
    }
}
