//! The steps of the loop in `train_phase`: train, log, evaluate, end a stage, checkpoint.

use candle_core::Tensor;

use retort_core::Result;

use crate::artifacts::checkpoint::{self, Snapshot, Tensors};
use crate::artifacts::events::{EarlyStopRecord, EvalRecord, Event, Recorder, SkipRecord, StageEndRecord, TrainRecord};
use crate::artifacts::report::EvalResult;
use crate::engine::optim::GradNorms;
use crate::engine::phase::early_stopping::Verdict;
use crate::engine::phase::gradient::{Gradient, StepGradient, StepInput};
use crate::engine::phase::stage_cursor::{ActiveStage, Step};
use crate::engine::phase::state::{BestState, PhaseState};

use super::PhaseRun;

/// How a step ended.
pub(in crate::engine::phase) enum StepOutcome {
    /// The update was applied.
    Applied(Applied),
    /// A non-finite loss or gradient: no update.
    Skipped,
}

/// What an applied step reports.
pub(in crate::engine::phase) struct Applied {
    loss: f64,
    term_values: Vec<f64>,
    weights: Vec<f64>,
    norms: GradNorms,
    lr: f64,
    elapsed_s: f64,
    tokens_per_s: f64,
}

impl PhaseRun<'_> {
    /// One optimizer step: its gradient, then the update, or a skip when something is not
    /// finite.
    pub fn train_step(&mut self, stage: &mut ActiveStage, step: Step, rec: &mut Recorder) -> Result<StepOutcome> {
        let def = self.plan.stage(stage.index);
        let base_weights: Vec<f64> = match &def.weights {
            Some(w) => w.iter().map(|w| w.at(step.progress)).collect(),
            None => self
                .objective
                .terms
                .iter()
                .map(|t| t.weight.at(step.progress))
                .collect(),
        };
        let lr = def.lr.at(step.progress) * def.lr_schedule.value(step.progress);
        let input = StepInput {
            stage: &stage.name,
            accum: stage.accum,
            progress: step.progress,
            base_weights: &base_weights,
            index: step.done - 1,
            stage_step: step.done - 1 - self.plan.start(stage.index),
            stage_lambda: def.on_policy_lambda,
            loss_scale: self.loss_scale.map_or(1.0, |s| s.scale),
        };
        let gradient = self.objective.gradient(&mut self.batcher, &stage.opt, input)?;
        if let Some(s) = self.stages.last_mut() {
            s.steps = step.done - stage.start;
        }
        match gradient {
            Gradient::NonFinite { what, value, gradient } => {
                let scale = self.loss_scale.as_mut().filter(|_| gradient);
                match scale.map(|s| (s.scale, s.on_overflow(), s.scale)) {
                    Some((was, true, now)) => {
                        let what = format!("{what} (overflow at loss scale {was}; now {now})");
                        self.skip_overflow(stage, step, &what, value, rec)?;
                    }
                    _ => self.skip(stage, step, &what, value, rec)?,
                }
                Ok(StepOutcome::Skipped)
            }
            Gradient::Finite(g) => Ok(StepOutcome::Applied(self.apply(stage, step, g, lr)?)),
        }
    }

    fn skip(&mut self, stage: &ActiveStage, step: Step, what: &str, value: f64, rec: &mut Recorder) -> Result<()> {
        self.skips.count(self.label, step.done, what, value);
        rec.record(&Event::Skip(SkipRecord {
            at: self.at(&stage.name, step.done),
            cause: what.to_string(),
            value: value.to_string(),
            skipped_total: self.skips.skipped,
        }))?;
        self.skips
            .check(self.label, step.done, what, value, self.train.max_consecutive_skips)?;
        self.bar.set_position(step.done as u64);
        Ok(())
    }

    /// A step skipped because a dynamic loss scale overflowed the gradient (the scale was
    /// halved): recorded, but not counted against `train.max_consecutive_skips`.
    fn skip_overflow(
        &mut self,
        stage: &ActiveStage,
        step: Step,
        what: &str,
        value: f64,
        rec: &mut Recorder,
    ) -> Result<()> {
        self.skips.count_overflow(self.label, step.done, what);
        rec.record(&Event::Skip(SkipRecord {
            at: self.at(&stage.name, step.done),
            cause: what.to_string(),
            value: value.to_string(),
            skipped_total: self.skips.skipped,
        }))?;
        self.bar.set_position(step.done as u64);
        Ok(())
    }

    fn apply(&mut self, stage: &mut ActiveStage, step: Step, g: StepGradient, lr: f64) -> Result<Applied> {
        self.skips.applied();
        if let Some(s) = self.loss_scale.as_mut() {
            s.on_applied();
        }
        let loss = g.total();
        let StepGradient {
            grads,
            norms,
            term_values,
            weights,
            rollout,
        } = g;
        if let Some(r) = &rollout {
            self.rollouts.add(r);
        }
        stage.opt.step(grads, lr, norms.total)?;
        self.world.check_same_parameters(&self.all_vars, step.done)?;
        if let Some(ema) = self.ema.as_mut() {
            ema.update(&self.model_vars)?;
        }
        self.losses.push(loss);
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let tokens = self.plan.tokens_at(step.done) - self.plan.tokens_at(self.first_step);
        let tokens_per_s = tokens as f64 / elapsed_s.max(1e-9);
        self.bar.set_position(step.done as u64);
        self.bar
            .set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
        Ok(Applied {
            loss,
            term_values,
            weights,
            norms,
            lr,
            elapsed_s,
            tokens_per_s,
        })
    }

    /// The train record, every `log_every` steps and at the end of every stage.
    pub fn log_if_due(&mut self, stage: &ActiveStage, step: Step, a: &Applied, rec: &mut Recorder) -> Result<()> {
        let every = self.train.log_every;
        let due = every > 0
            && (step.done.is_multiple_of(every) || step.done == self.plan.total() || stage.ends_at(step.done));
        if !due {
            return Ok(());
        }
        let names = self.objective.names();
        let by_name = |v: &[f64]| names.iter().cloned().zip(v.iter().copied()).collect();
        let scalars = self.objective.terms.iter().flat_map(|t| {
            let scalars = t.term.scalars(step.progress).into_iter();
            scalars.map(move |(k, v)| (format!("{}.{k}", t.name), v))
        });
        let scalars = scalars.chain(self.loss_scale.map(|s| ("loss_scale".to_string(), s.scale)));
        let group_norms = stage
            .groups
            .iter()
            .map(|g| g.pattern.clone())
            .zip(a.norms.per_group.iter().copied());
        rec.record(&Event::Train(TrainRecord {
            at: self.at(&stage.name, step.done),
            loss: a.loss,
            terms: by_name(&a.term_values),
            weights: by_name(&a.weights),
            scalars: scalars.collect(),
            router: self.objective.router.scalars().into_iter().collect(),
            lr: a.lr,
            grad_norm: a.norms.total,
            grad_norm_groups: group_norms.collect(),
            tokens: self.plan.tokens_at(step.done),
            tokens_per_s: a.tokens_per_s,
            elapsed_s: a.elapsed_s,
            skipped_total: self.skips.skipped,
            on_policy: std::mem::take(&mut self.rollouts).record(),
        }))
    }

    /// The periodic evaluation when due, with early stopping's verdict on it.
    pub fn evaluate_if_due(
        &mut self,
        stage: &ActiveStage,
        step: Step,
        rec: &mut Recorder,
    ) -> Result<Option<EvalResult>> {
        if !self.eval.due(step.done) {
            return Ok(None);
        }
        let r = self
            .eval
            .as_exported(self.student, &self.model_vars, self.ema.as_ref())?;
        rec.record(&Event::Eval(EvalRecord {
            at: self.at(&stage.name, step.done),
            result: r,
        }))?;
        let Some(e) = self.early.as_mut() else {
            return Ok(Some(r));
        };
        match e.observe(e.metric(&r)?, step.done) {
            Verdict::Improved => self.keep_best(step.done)?,
            Verdict::Wait => {}
            Verdict::Stop => {
                self.stopped_early_at = Some(step.done);
                let record = self.early.as_ref().map(|e| e.state.clone());
                tracing::info!("{}: early stopping at step {} ({record:?})", self.label, step.done);
                rec.record(&Event::EarlyStop(EarlyStopRecord {
                    at: self.at(&stage.name, step.done),
                    record,
                }))?;
            }
        }
        Ok(Some(r))
    }

    /// Whether early stopping ended the phase.
    pub fn stopped_early(&self) -> bool {
        self.stopped_early_at.is_some()
    }

    /// Keeps the weights just evaluated as the best (and writes them to `best/`).
    fn keep_best(&mut self, step: usize) -> Result<()> {
        let weights: Vec<Tensor> = match &self.ema {
            Some(avg) => avg.weights().to_vec(),
            None => self
                .model_vars
                .iter()
                .map(|(_, v)| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<_>>()?,
        };
        let Some(e) = self.early.as_mut() else {
            return Ok(());
        };
        if let Some(policy) = self.checkpoints.as_ref().filter(|p| p.writes) {
            let model: Tensors = self
                .model_vars
                .iter()
                .map(|(n, _)| n.clone())
                .zip(weights.iter().cloned())
                .collect();
            let state = BestState {
                phase: self.label.to_string(),
                step,
                early: e.state.clone(),
            };
            let snapshot = Snapshot {
                state: &state,
                tensors: vec![("model", &model)],
            };
            checkpoint::write_best(&policy.root, &snapshot)?;
        }
        e.best_weights = Some(weights);
        Ok(())
    }

    /// At the end of a stage of a multi-stage phase: its evaluation (the one just made, if
    /// any) and its `stage_end` record.
    pub fn end_stage_if_done(
        &mut self,
        stage: &ActiveStage,
        step: Step,
        evaluated: Option<EvalResult>,
        rec: &mut Recorder,
    ) -> Result<()> {
        if !(stage.ends_at(step.done) && self.plan.len() > 1) {
            return Ok(());
        }
        let r = match evaluated {
            Some(r) => r,
            None => self
                .eval
                .as_exported(self.student, &self.model_vars, self.ema.as_ref())?,
        };
        self.close_stage(stage);
        let final_loss = self.stages.last_mut().and_then(|s| {
            s.val_loss = Some(r.val_loss);
            s.final_loss
        });
        rec.record(&Event::StageEnd(StageEndRecord {
            at: self.at(&stage.name, step.done),
            result: r,
            final_loss,
        }))
    }

    /// Sets the stage's final loss: the mean total loss of its last (up to) 10 applied steps.
    pub fn close_stage(&mut self, stage: &ActiveStage) {
        let n = 10.min(self.plan.stage(stage.index).steps);
        let tail = &self.losses[self.losses.len().saturating_sub(n)..];
        if let Some(s) = self.stages.last_mut() {
            s.final_loss = (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64);
        }
    }

    /// A resumable checkpoint when one is due.
    pub fn checkpoint_if_due(&self, stage: &ActiveStage, step: Step) -> Result<()> {
        let Some(policy) = &self.checkpoints else {
            return Ok(());
        };
        if !policy.due(step.done, self.plan.total(), stage.ends_at(step.done) && !stage.is_last) {
            return Ok(());
        }
        let mut model: Tensors = self
            .all_vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        if let Some(ema) = &self.ema {
            ema.save_into(&self.model_vars, &mut model);
        }
        let (optimizer, adam_t) = stage.opt.export_state();
        let state = PhaseState {
            run_id: policy.run_id.clone(),
            phase: self.label.to_string(),
            step: step.done,
            adam_t,
            batch_stream_pos: self.batcher.stream_pos().to_string(),
            router: self.objective.router.state(),
            skipped: self.skips.skipped,
            consecutive_skips: self.skips.consecutive,
            losses: self.losses.clone(),
            metrics: policy.metrics_mark()?,
            early: self.early.as_ref().map(|e| e.state.clone()),
            stages: self.stages.clone(),
            rollouts: self.rollouts.clone(),
            ranks: self.world.size(),
            loss_scale: self.loss_scale,
        };
        let snapshot = Snapshot {
            state: &state,
            tensors: vec![("model", &model), ("optimizer", &optimizer)],
        };
        checkpoint::write_step(&policy.root, step.done, &snapshot, policy.keep).map(|_| ())
    }
}
