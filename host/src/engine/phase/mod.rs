//! One training phase — teacher pretraining, distillation or the scratch baseline — as a small
//! state machine over stages and steps.
//!
//! A phase runs its stages in order; each stage gets a fresh AdamW (or, resumed inside it, the
//! checkpoint's). One step: batch -> teacher forward (no grad, only if a term needs it) ->
//! student forward (with the taps the terms asked for) -> each term -> router weights ->
//! `total = sum_i w_i * term_i` -> backward -> AdamW (clipped) -> metrics. On an on-policy step
//! ([`OnPolicyPlan`]) the batch's windows are first continued by the sampler (`engine::rollout`)
//! and the step trains on the sampled tokens. A step whose loss or
//! gradient is not finite is skipped (no update), and then nothing else happens at that step.
//! After an applied step, in this order: the train record (every `log_every`), the periodic
//! evaluation (and early stopping), the stage's end (multi-stage phases), the checkpoint.
//!
//! In a data-parallel run ([`World`]) every rank runs the same loop on its rows of each batch:
//! the micro-batches' loss values and the step's gradient are averaged across the ranks
//! before anything reads them, so every rank takes the same decisions and applies the same
//! update; only rank 0 writes checkpoints.

mod checkpointing;
mod early_stopping;
mod ema;
mod evaluation;
mod gradient;
mod loss_scale;
mod run;
mod skip_guard;
mod stage_cursor;
mod state;

use candle_core::Tensor;

use retort_core::config::{EarlyStoppingSpec, TrainSection};
use retort_core::{Batch, DataSource, Result, Router, Student, Teacher};

use crate::artifacts::checkpoint::Checkpoint;
use crate::artifacts::events::Recorder;
use crate::artifacts::report::PhaseStats;
use crate::assemble::{Stage, TermSlot};
use crate::engine::parallel::World;

pub use crate::assemble::HeadPath;
use crate::assemble::OnPolicyPlan;
pub use checkpointing::CheckpointPolicy;
pub use state::{BestState, PhaseState};

use run::{PhaseRun, StepOutcome};

/// One training phase (`teacher`, `student` or `baseline`): what it trains, on what, how.
pub struct Phase<'a> {
    /// Label in metrics and the progress bar.
    pub label: &'static str,
    /// The model being trained.
    pub student: &'a dyn Student,
    /// The teacher, when a term needs one.
    pub teacher: Option<&'a dyn Teacher>,
    /// The objective.
    pub terms: &'a [TermSlot],
    /// Weighs the terms each step.
    pub router: Box<dyn Router>,
    /// The stages, run in order (at least one).
    pub stages: Vec<Stage>,
    /// Batch size, window, EMA, skip and logging settings.
    pub train: &'a TrainSection,
    /// Seed of the batch sequence.
    pub batch_seed: u64,
    /// Validation batches for periodic evaluation (this rank's share in a data-parallel run).
    pub val: &'a [Batch],
    /// The teacher's logits on `val` (one tensor per batch), for agreement and KL in evaluations.
    pub val_teacher: Option<&'a [Tensor]>,
    /// Evaluate every this many steps (0: only at the end of the run).
    pub eval_every: usize,
    /// Early stopping, if on for this phase.
    pub early_stopping: Option<&'a EarlyStoppingSpec>,
    /// Periodic resumable checkpoints, if any.
    pub checkpoints: Option<CheckpointPolicy>,
    /// A checkpoint of this phase to continue from.
    pub resume: Option<Checkpoint<PhaseState>>,
    /// Show a progress bar.
    pub progress_bar: bool,
    /// Which steps train on samples, and how they are drawn (`None`: every step on the data).
    pub on_policy: Option<&'a OnPolicyPlan>,
    /// The ranks training together (one process: [`World::single`]).
    pub world: &'a World,
}

/// Runs `phase` over the training split of `data`, sending its records to `recorder`, on
/// retort's rayon pool ([`super::pool`]).
pub fn train_phase(phase: Phase, data: &dyn DataSource, recorder: &mut Recorder) -> Result<PhaseStats> {
    super::pool::on_pool(|| {
        let mut run = PhaseRun::start(phase, data)?;
        'phase: while let Some(mut stage) = run.open_next_stage(recorder)? {
            while let Some(step) = stage.next_step() {
                let StepOutcome::Applied(applied) = run.train_step(&mut stage, step, recorder)? else {
                    continue; // a non-finite step: no update, and nothing else happens at it
                };
                run.log_if_due(&stage, step, &applied, recorder)?;
                let evaluated = run.evaluate_if_due(&stage, step, recorder)?;
                if run.stopped_early() {
                    run.close_stage(&stage);
                    break 'phase;
                }
                run.end_stage_if_done(&stage, step, evaluated, recorder)?;
                run.checkpoint_if_due(&stage, step)?;
            }
            run.close_stage(&stage);
        }
        run.finish(recorder)
    })
}
