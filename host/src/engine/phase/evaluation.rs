//! Evaluations inside a phase: when they are due, and of which weights.

use candle_core::{Tensor, Var};

use retort_core::{Batch, Result, Student, TapSet};

use crate::artifacts::report::EvalResult;
use crate::engine::evaluate::evaluate_in;
use crate::engine::parallel::World;

use super::ema::Ema;

/// The validation data of a phase and how often it is evaluated.
pub(super) struct PhaseEval<'a> {
    val: &'a [Batch],
    val_teacher: Option<&'a [Tensor]>,
    every: usize,
    total: usize,
    world: &'a World,
}

impl<'a> PhaseEval<'a> {
    /// Evaluations on `val` (this rank's share of the validation batches of `world`) every
    /// `every` steps of a phase of `total` steps (0: none during the phase); `val_teacher`
    /// gives agreement and KL.
    pub fn new(
        val: &'a [Batch],
        val_teacher: Option<&'a [Tensor]>,
        every: usize,
        total: usize,
        world: &'a World,
    ) -> Self {
        PhaseEval {
            val,
            val_teacher,
            every,
            total,
            world,
        }
    }

    /// Whether an evaluation is due after step `done`: every `every` steps but the last (the
    /// run evaluates every finished model anyway).
    pub fn due(&self, done: usize) -> bool {
        self.every > 0 && done.is_multiple_of(self.every) && done != self.total
    }

    /// The student's current weights.
    pub fn current(&self, student: &dyn Student) -> Result<EvalResult> {
        evaluate_in(
            &|_, b| Ok(student.forward(b, &TapSet::none())?.logits),
            self.val,
            self.val_teacher,
            self.world,
        )
    }

    /// The weights the phase would export now: the EMA when there is one (swapped in and back
    /// out), else the current ones.
    pub fn as_exported(&self, student: &dyn Student, vars: &[(String, Var)], ema: Option<&Ema>) -> Result<EvalResult> {
        match ema {
            Some(e) => with_weights(vars, e.weights(), || self.current(student)),
            None => self.current(student),
        }
    }
}

/// Runs `f` with `vars` temporarily holding `weights`, then puts the old values back.
fn with_weights<T>(vars: &[(String, Var)], weights: &[Tensor], f: impl FnOnce() -> Result<T>) -> Result<T> {
    let saved: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().detach().copy())
        .collect::<candle_core::Result<_>>()?;
    for ((_, v), w) in vars.iter().zip(weights) {
        v.set(w)?;
    }
    let out = f();
    for ((_, v), w) in vars.iter().zip(&saved) {
        v.set(w)?;
    }
    out
}
