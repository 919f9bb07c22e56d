//! Routers: turn per-term signals into per-term weights each step.

use candle_core::Tensor;

use crate::{Progress, Result, StepContext};

/// Per-term signals of one step, index-aligned with the configured loss terms.
#[derive(Debug, Clone, Copy)]
pub struct TermSignals<'a> {
    /// Term names (`kl`, `ce`, or the configured `name`).
    pub names: &'a [String],
    /// Term values of this step (before weighting); all NaN for a router whose
    /// [`Router::reads_step_outputs`] is false when the engine weighs before computing.
    pub values: &'a [f64],
    /// Configured weights (schedules evaluated at this step).
    pub base_weights: &'a [f64],
    /// Whether each term reads intermediate features (hidden states, attention) rather than
    /// only logits.
    pub reads_features: &'a [bool],
    /// Training progress.
    pub progress: Progress,
}

/// Decides the weight of each term. May keep state across steps, hence `&mut self`.
pub trait Router: Send {
    /// Called after the forward passes and before the terms: may return per-token weights
    /// `[batch, seq]` for the logit distillation terms (see `StepContext::token_weights`).
    fn prepare(&mut self, _ctx: &StepContext) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Weights for this step, one per term.
    fn weights(&mut self, signals: &TermSignals) -> Result<Vec<f64>>;
    /// Whether the router reads what a step computes: the terms' values in
    /// [`Router::weights`] (`TermSignals::values`) or the models' outputs in
    /// [`Router::prepare`]. A router that reads neither (its weights depend on the progress and
    /// the configured weights only) is asked for its weights before the terms are computed, with
    /// `values` all NaN, which lets the engine fuse the terms with the student's output head.
    /// Default: true.
    fn reads_step_outputs(&self) -> bool {
        true
    }
    /// Called once at assembly with the term names; a router that refers to terms by name
    /// rejects unknown names here (as a config error under `router`).
    fn check_terms(&self, _names: &[String]) -> Result<()> {
        Ok(())
    }
    /// Internal quantities to log with every metrics record (e.g. running magnitudes).
    fn scalars(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// The router's state across steps, saved in checkpoints (stateless routers: null).
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Restores a state from [`Router::state`] when a run resumes.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}
