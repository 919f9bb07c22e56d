//! [`PhaseRun`]: the state of a phase between its steps, and the steps of the loop in
//! `super::train_phase`, each a method.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};

use retort_core::config::{TrainSection, WindowSampling};
use retort_core::{DataSource, Error, Result, Split, Student};

use crate::artifacts::checkpoint::{self, Checkpoint, Snapshot, Tensors};
use crate::artifacts::events::{
    At, EarlyStopRecord, EvalRecord, Event, GroupSummary, ParamGroupsRecord, Recorder, SkipRecord, StageEndRecord,
    TrainRecord,
};
use crate::artifacts::report::{BestEval, EvalResult, PhaseStats, StageStats};
use crate::assemble::assign_groups;
use crate::engine::batching::TrainBatcher;
use crate::engine::optim::{AdamW, AdamWConfig, GradNorms};

use super::checkpointing::CheckpointPolicy;
use super::early_stopping::{EarlyStopping, Verdict};
use super::ema::Ema;
use super::evaluation::PhaseEval;
use super::gradient::{Gradient, Objective, StepGradient, StepInput};
use super::skip_guard::SkipGuard;
use super::stage_cursor::{ActiveStage, StagePlan, Step};
use super::state::{BestState, PhaseState};
use super::Phase;

/// How a step ended.
pub(super) enum StepOutcome {
    /// The update was applied.
    Applied(Applied),
    /// A non-finite loss or gradient: no update.
    Skipped,
}

/// What an applied step reports.
pub(super) struct Applied {
    loss: f64,
    term_values: Vec<f64>,
    weights: Vec<f64>,
    norms: GradNorms,
    lr: f64,
    elapsed_s: f64,
    tokens_per_s: f64,
}

/// A phase in progress.
pub(super) struct PhaseRun<'a> {
    label: &'static str,
    student: &'a dyn Student,
    train: &'a TrainSection,
    objective: Objective<'a>,
    batcher: TrainBatcher<'a>,
    plan: StagePlan,
    next_stage: usize,
    /// The student's parameters and those the terms own (projections), optimised together.
    all_vars: Vec<(String, Var)>,
    /// The student's own parameters (averaged, evaluated, exported).
    model_vars: Vec<(String, Var)>,
    ema: Option<Ema>,
    early: Option<EarlyStopping<'a>>,
    eval: PhaseEval<'a>,
    skips: SkipGuard,
    /// Total loss of every applied step.
    losses: Vec<f64>,
    stages: Vec<StageStats>,
    checkpoints: Option<CheckpointPolicy>,
    /// A resumed checkpoint's optimizer state, for the stage it was taken in.
    resumed_optimizer: Option<(Tensors, i32)>,
    /// The step the phase (re)started at.
    first_step: usize,
    started: Instant,
    bar: ProgressBar,
    stopped_early_at: Option<usize>,
}

impl<'a> PhaseRun<'a> {
    /// Sets the phase up, continuing from `phase.resume` when given.
    pub fn start(phase: Phase<'a>, data: &'a dyn DataSource) -> Result<Self> {
        let plan = StagePlan::new(phase.label, phase.stages, phase.train)?;
        let device = student_device(phase.student)?;
        let train = phase.train;
        let batcher = TrainBatcher::new(
            data.tokens(Split::Train),
            train.batch_size,
            train.seq_len,
            train.windows.unwrap_or(WindowSampling::Random),
            phase.batch_seed,
            &device,
        )?;
        let model_vars = phase.student.vars();
        let mut all_vars = phase.student.vars();
        for slot in phase.terms {
            let owned = slot.term.vars().into_iter();
            all_vars.extend(owned.map(|(n, v)| (format!("loss.{}.{n}", slot.name), v)));
        }
        let mut run = PhaseRun {
            label: phase.label,
            student: phase.student,
            train,
            objective: Objective::new(phase.label, phase.terms, phase.router, phase.student, phase.teacher)?,
            batcher,
            eval: PhaseEval::new(phase.val, phase.val_teacher, phase.eval_every, plan.total()),
            bar: progress_bar(phase.label, plan.total(), phase.progress_bar)?,
            plan,
            next_stage: 0,
            ema: train.ema_decay.map(|d| Ema::new(d, &model_vars)).transpose()?,
            early: phase.early_stopping.map(EarlyStopping::new),
            all_vars,
            model_vars,
            skips: SkipGuard::default(),
            losses: Vec::new(),
            stages: Vec::new(),
            checkpoints: phase.checkpoints,
            resumed_optimizer: None,
            first_step: 0,
            started: Instant::now(),
            stopped_early_at: None,
        };
        if let Some(ck) = phase.resume {
            run.resume_from(ck, &device)?;
        }
        Ok(run)
    }

    /// Puts back everything a checkpoint of this phase saved.
    fn resume_from(&mut self, mut ck: Checkpoint<PhaseState>, device: &Device) -> Result<()> {
        let saved = tensors_of(&ck, &self.all_vars)?;
        for ((_, var), t) in self.all_vars.iter().zip(saved) {
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(ema) = self.ema.as_mut() {
            ema.restore(&ck, &self.model_vars)?;
        }
        let pos: u128 = ck.state.batch_stream_pos.parse().map_err(|_| {
            Error::input(
                format!("checkpoint {}", ck.dir.display()),
                "state.json: bad batch_stream_pos",
            )
        })?;
        self.batcher.set_stream_pos(pos);
        self.objective.router.restore(&ck.state.router)?;
        self.losses = std::mem::take(&mut ck.state.losses);
        self.stages = std::mem::take(&mut ck.state.stages);
        self.skips = SkipGuard {
            skipped: ck.state.skipped,
            consecutive: ck.state.consecutive_skips,
        };
        self.first_step = ck.state.step;
        self.resume_early_stopping(ck.state.early.take(), device)?;
        self.resumed_optimizer = Some((ck.take_tensors("optimizer"), ck.state.adam_t));
        tracing::info!(
            "{}: resumed at step {} from {}",
            self.label,
            self.first_step,
            ck.dir.display()
        );
        self.bar.set_position(self.first_step as u64);
        Ok(())
    }

    /// Early stopping's record from a checkpoint, with the best weights from `best/` when
    /// they belong to it (a later best, written after the checkpoint, is found again).
    fn resume_early_stopping(
        &mut self,
        saved: Option<crate::artifacts::events::EarlyState>,
        device: &Device,
    ) -> Result<()> {
        let (Some(e), Some(state)) = (self.early.as_mut(), saved) else {
            return Ok(());
        };
        e.state = state;
        let Some(policy) = &self.checkpoints else {
            return Ok(());
        };
        if let Some(best) = checkpoint::load_best::<BestState>(&policy.root, device)? {
            if best.state.step == e.state.best_step {
                e.best_weights = Some(tensors_of(&best, &self.model_vars)?);
            }
        }
        Ok(())
    }

    /// The next stage not finished yet, with its optimizer: fresh at the stage's first step,
    /// the checkpoint's when resumed inside it.
    pub fn open_next_stage(&mut self, rec: &mut Recorder) -> Result<Option<ActiveStage>> {
        while self.next_stage < self.plan.len() && self.plan.end(self.next_stage) <= self.first_step {
            self.next_stage += 1;
        }
        if self.next_stage == self.plan.len() {
            return Ok(None);
        }
        let index = self.next_stage;
        self.next_stage += 1;
        let stage = self.plan.stage(index);
        let offset = self.first_step.saturating_sub(self.plan.start(index));
        let (grouped, groups) = assign_groups(
            self.all_vars.clone(),
            &stage.param_groups,
            stage.weight_decay,
            &stage.groups_key,
        )?;
        let trainable: usize = groups.iter().filter(|g| g.lr_mult > 0.0).map(|g| g.parameters).sum();
        let mut opt = AdamW::new(grouped, groups.len(), self.adamw_config(index))?;
        match (offset, self.resumed_optimizer.take()) {
            (0, _) => self.announce_stage(index, &groups, trainable, rec)?,
            (_, Some((state, t))) => opt.import_state(&state, t)?,
            (_, None) => {}
        }
        Ok(Some(ActiveStage::new(&self.plan, index, offset, opt, groups)))
    }

    fn adamw_config(&self, index: usize) -> AdamWConfig {
        let stage = self.plan.stage(index);
        AdamWConfig {
            beta1: self.train.beta1,
            beta2: self.train.beta2,
            eps: self.train.eps,
            weight_decay: stage.weight_decay,
            grad_clip: stage.grad_clip,
        }
    }

    /// Logs the groups of a stage starting now and opens its statistics.
    fn announce_stage(
        &mut self,
        index: usize,
        groups: &[GroupSummary],
        trainable: usize,
        rec: &mut Recorder,
    ) -> Result<()> {
        let stage = self.plan.stage(index);
        let start = self.plan.start(index);
        let lr = stage.lr.at(retort_core::Progress::new(0, stage.steps));
        for g in groups {
            tracing::info!(
                "{} stage {} param group {:<28} tensors {:>3} parameters {:>9} lr x{} weight decay {}",
                self.label,
                stage.name,
                g.pattern,
                g.tensors,
                g.parameters,
                g.lr_mult,
                g.weight_decay
            );
        }
        rec.record(&Event::ParamGroups(ParamGroupsRecord {
            at: self.at(&stage.name, start),
            steps: stage.steps,
            lr,
            groups: groups.to_vec(),
        }))?;
        self.stages.push(StageStats {
            name: stage.name.clone(),
            steps: 0,
            first_step: start,
            lr,
            trainable_params: trainable,
            final_loss: None,
            val_loss: None,
        });
        Ok(())
    }

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
        };
        let gradient = self.objective.gradient(&mut self.batcher, &stage.opt, input)?;
        if let Some(s) = self.stages.last_mut() {
            s.steps = step.done - stage.start;
        }
        match gradient {
            Gradient::NonFinite { what, value } => {
                self.skip(stage, step, &what, value, rec)?;
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

    fn apply(&mut self, stage: &mut ActiveStage, step: Step, g: StepGradient, lr: f64) -> Result<Applied> {
        self.skips.applied();
        let loss = g.total();
        let StepGradient {
            grads,
            norms,
            term_values,
            weights,
        } = g;
        stage.opt.step(grads, lr, norms.total)?;
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
    pub fn log_if_due(&self, stage: &ActiveStage, step: Step, a: &Applied, rec: &mut Recorder) -> Result<()> {
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
        if let Some(policy) = &self.checkpoints {
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
            phase: self.label.to_string(),
            step: step.done,
            adam_t,
            batch_stream_pos: self.batcher.stream_pos().to_string(),
            router: self.objective.router.state(),
            skipped: self.skips.skipped,
            consecutive_skips: self.skips.consecutive,
            losses: self.losses.clone(),
            metrics_len: policy.metrics_len(),
            early: self.early.as_ref().map(|e| e.state.clone()),
            stages: self.stages.clone(),
        };
        let snapshot = Snapshot {
            state: &state,
            tensors: vec![("model", &model), ("optimizer", &optimizer)],
        };
        checkpoint::write_step(&policy.root, step.done, &snapshot, policy.keep).map(|_| ())
    }

    /// Ends the phase: the EMA (if any) becomes the weights, early stopping puts back its best,
    /// and the statistics are returned.
    pub fn finish(mut self, rec: &mut Recorder) -> Result<PhaseStats> {
        self.bar.finish_and_clear();
        if let Some(ema) = self.ema.take() {
            // The phase ends with the averaged weights: they are what is evaluated and exported.
            for ((_, var), t) in self.model_vars.iter().zip(ema.weights()) {
                var.set(t)?;
            }
        }
        let steps_run = self.stopped_early_at.unwrap_or(self.plan.total());
        let best = match self.early.take() {
            Some(e) => self.settle_best(e, steps_run, rec)?,
            None => None,
        };
        let wall_s = self.started.elapsed().as_secs_f64();
        let tokens = self.plan.tokens_at(steps_run);
        let resumed_tokens = self.plan.tokens_at(self.first_step.min(steps_run));
        Ok(PhaseStats {
            steps: steps_run,
            skipped: self.skips.skipped,
            tokens,
            wall_s,
            tokens_per_s: (tokens - resumed_tokens) as f64 / wall_s.max(1e-9),
            losses: self.losses,
            stages: self.stages,
            best,
            stopped_early_at: self.stopped_early_at,
        })
    }

    /// The final weights are a candidate too (unless the last evaluation just saw them); the
    /// best weights are put back and reported.
    fn settle_best(&mut self, mut e: EarlyStopping, steps_run: usize, rec: &mut Recorder) -> Result<Option<BestEval>> {
        if !self.eval.due(steps_run) {
            let r = self.eval.current(self.student)?;
            e.consider_final(e.metric(&r)?, steps_run);
        }
        if e.state.best_step != steps_run {
            let weights = match e.best_weights.take() {
                Some(w) => w,
                None => self.load_best_weights()?,
            };
            for ((_, var), t) in self.model_vars.iter().zip(&weights) {
                var.set(t)?;
            }
        }
        let Some(value) = e.state.best else {
            return Ok(None);
        };
        let best = BestEval {
            metric: e.state.metric.clone(),
            value,
            step: e.state.best_step,
        };
        rec.record(&Event::Best(crate::artifacts::events::BestRecord {
            phase: self.label.to_string(),
            metric: best.metric.clone(),
            value,
            step: best.step,
        }))?;
        Ok(Some(best))
    }

    fn load_best_weights(&self) -> Result<Vec<Tensor>> {
        let root = self
            .checkpoints
            .as_ref()
            .map(|p| p.root.clone())
            .ok_or_else(|| Error::Runtime(format!("phase `{}`: the best weights were not kept", self.label)))?;
        let device = student_device(self.student)?;
        let ck = checkpoint::load_best::<BestState>(&root, &device)?
            .ok_or_else(|| Error::Runtime(format!("{}: no best checkpoint", root.display())))?;
        tensors_of(&ck, &self.model_vars)
    }

    fn at(&self, stage: &str, step: usize) -> At {
        At {
            phase: self.label.to_string(),
            stage: stage.to_string(),
            step,
        }
    }
}

/// The model tensors of `ck` for `vars`, in their order.
fn tensors_of<S>(ck: &Checkpoint<S>, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    vars.iter().map(|(n, _)| ck.tensor("model", n)).collect()
}

fn student_device(student: &dyn Student) -> Result<Device> {
    student
        .vars()
        .first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| Error::Runtime("the student has no trainable parameters".into()))
}

fn progress_bar(label: &'static str, total: usize, shown: bool) -> Result<ProgressBar> {
    let bar = if shown {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    let style = ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
        .map_err(|e| retort_core::Error::failed("the progress bar's template", e))?;
    bar.set_style(style.progress_chars("=> "));
    bar.set_prefix(label);
    Ok(bar)
}
