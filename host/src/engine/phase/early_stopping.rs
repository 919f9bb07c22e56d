//! Early stopping on an evaluation metric (`train.early_stopping`): the phase stops after
//! `patience` evaluations without an improvement of more than `min_delta`, and ends with the
//! best evaluated weights (kept in memory and, with checkpoints on, in `checkpoints/<phase>/best`).

use candle_core::Tensor;

use retort_core::config::{EarlyStoppingMetric, EarlyStoppingSpec};
use retort_core::{Error, Result};

use crate::artifacts::events::EarlyState;
use crate::artifacts::report::EvalResult;

/// Early stopping's bookkeeping.
pub(super) struct EarlyStopping<'a> {
    spec: &'a EarlyStoppingSpec,
    /// The record so far (saved in checkpoints).
    pub state: EarlyState,
    /// The best evaluated weights in the model's parameter order, when held in memory.
    pub best_weights: Option<Vec<Tensor>>,
}

/// What an evaluation meant for early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// A new best: keep these weights.
    Improved,
    /// No improvement, patience left.
    Wait,
    /// No improvement and patience exhausted: stop the phase.
    Stop,
}

impl<'a> EarlyStopping<'a> {
    /// Early stopping with no evaluation seen yet.
    pub fn new(spec: &'a EarlyStoppingSpec) -> Self {
        EarlyStopping {
            spec,
            state: EarlyState {
                metric: spec.metric.name().into(),
                best: None,
                best_step: 0,
                bad_evals: 0,
            },
            best_weights: None,
        }
    }

    /// The watched metric of `r`; an error if the phase cannot measure it.
    pub fn metric(&self, r: &EvalResult) -> Result<f64> {
        let v = match self.spec.metric {
            EarlyStoppingMetric::ValLoss => Some(r.val_loss),
            EarlyStoppingMetric::KlToTeacher => r.kl_to_teacher,
            EarlyStoppingMetric::Top1Agreement => r.top1_agreement,
        };
        v.ok_or_else(|| {
            Error::Runtime(format!(
                "early stopping watches `{}`, which this phase cannot measure (no teacher logits)",
                self.spec.metric.name()
            ))
        })
    }

    /// Whether `value` improves on the best by more than `min_delta`.
    pub fn improves(&self, value: f64) -> bool {
        match self.state.best {
            None => value.is_finite(),
            Some(best) if self.spec.metric.higher_is_better() => value > best + self.spec.min_delta,
            Some(best) => value < best - self.spec.min_delta,
        }
    }

    /// Takes the evaluation of step `step` into account (the caller keeps the weights on
    /// [`Verdict::Improved`]).
    pub fn observe(&mut self, value: f64, step: usize) -> Verdict {
        if self.improves(value) {
            self.state.best = Some(value);
            self.state.best_step = step;
            self.state.bad_evals = 0;
            return Verdict::Improved;
        }
        self.state.bad_evals += 1;
        if self.state.bad_evals >= self.spec.patience {
            Verdict::Stop
        } else {
            Verdict::Wait
        }
    }

    /// The final weights as a candidate (no patience is counted: the phase is over).
    pub fn consider_final(&mut self, value: f64, step: usize) {
        if self.improves(value) {
            self.state.best = Some(value);
            self.state.best_step = step;
            self.best_weights = None; // the current weights are the best
        }
    }
}
