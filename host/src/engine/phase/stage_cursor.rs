//! The stages of a phase laid end to end, and the stage being trained.

use retort_core::config::TrainSection;
use retort_core::{Error, Progress, Result};

use crate::artifacts::events::GroupSummary;
use crate::assemble::Stage;
use crate::engine::optim::AdamW;

/// The stages of a phase with their first steps: step `s` of the phase is step `s - start(i)`
/// of the stage `i` that contains it.
pub(super) struct StagePlan {
    stages: Vec<Stage>,
    starts: Vec<usize>,
    tokens_per_step: Vec<usize>,
    total: usize,
}

impl StagePlan {
    /// The plan of `stages` (at least one) with `train`'s batch shape.
    pub fn new(label: &str, stages: Vec<Stage>, train: &TrainSection) -> Result<Self> {
        if stages.is_empty() {
            return Err(Error::Runtime(format!("phase `{label}` has no stages")));
        }
        let starts = stages
            .iter()
            .scan(0usize, |acc, s| {
                let start = *acc;
                *acc += s.steps;
                Some(start)
            })
            .collect();
        let tokens_per_step = stages
            .iter()
            .map(|s| train.batch_size * train.seq_len * s.grad_accum.max(1))
            .collect();
        Ok(StagePlan {
            total: stages.iter().map(|s| s.steps).sum(),
            stages,
            starts,
            tokens_per_step,
        })
    }

    /// Steps of the whole phase.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Stage `i`.
    pub fn stage(&self, i: usize) -> &Stage {
        &self.stages[i]
    }

    /// First step of stage `i` within the phase.
    pub fn start(&self, i: usize) -> usize {
        self.starts[i]
    }

    /// The step after the last of stage `i`.
    pub fn end(&self, i: usize) -> usize {
        self.starts[i] + self.stages[i].steps
    }

    /// Training tokens seen after `step` steps of the phase.
    pub fn tokens_at(&self, step: usize) -> usize {
        self.stages
            .iter()
            .zip(&self.starts)
            .zip(&self.tokens_per_step)
            .map(|((s, &start), &per_step)| step.saturating_sub(start).min(s.steps) * per_step)
            .sum()
    }
}

/// One step of a stage.
#[derive(Debug, Clone, Copy)]
pub(super) struct Step {
    /// Steps of the phase done once this one is: the step's number in metrics.
    pub done: usize,
    /// Progress within the stage (what every schedule reads).
    pub progress: Progress,
}

/// The stage being trained: its optimizer and the steps left.
pub(super) struct ActiveStage {
    /// Index in the plan.
    pub index: usize,
    /// Name in metrics.
    pub name: String,
    /// First step of the stage within the phase.
    pub start: usize,
    /// The step after its last.
    pub end: usize,
    /// Micro-batches per step.
    pub accum: usize,
    /// Whether it is the phase's last stage.
    pub is_last: bool,
    /// The stage's AdamW.
    pub opt: AdamW,
    /// Its parameter groups, as logged.
    pub groups: Vec<GroupSummary>,
    next: usize,
    steps: usize,
}

impl ActiveStage {
    /// Stage `index` of `plan` with optimizer `opt`, continuing at step `offset` of the stage.
    pub fn new(plan: &StagePlan, index: usize, offset: usize, opt: AdamW, groups: Vec<GroupSummary>) -> Self {
        let stage = plan.stage(index);
        ActiveStage {
            index,
            name: stage.name.clone(),
            start: plan.start(index),
            end: plan.end(index),
            accum: stage.grad_accum.max(1),
            is_last: index + 1 == plan.len(),
            opt,
            groups,
            next: offset,
            steps: stage.steps,
        }
    }

    /// The next step, until the stage is done.
    pub fn next_step(&mut self) -> Option<Step> {
        if self.next >= self.steps {
            return None;
        }
        let k = self.next;
        self.next += 1;
        Some(Step {
            done: self.start + k + 1,
            progress: Progress::new(k, self.steps),
        })
    }

    /// Whether step `done` is the stage's last.
    pub fn ends_at(&self, done: usize) -> bool {
        done == self.end
    }
}
