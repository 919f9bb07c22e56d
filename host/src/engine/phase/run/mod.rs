//! [`PhaseRun`]: the state of a phase between its steps. Setting up and opening stages here;
//! the steps of the loop in `super::train_phase` in [`step`], the end of the phase in
//! [`finish`], each a method.

mod finish;
mod step;

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};

use retort_core::config::{TrainSection, WindowSampling};
use retort_core::{DataSource, Error, Result, Split, Student};

use crate::artifacts::checkpoint::{self, Checkpoint, Tensors};
use crate::artifacts::events::{At, Event, GroupSummary, ParamGroupsRecord, Recorder};
use crate::artifacts::report::StageStats;
use crate::assemble::assign_groups;
use crate::engine::batching::TrainBatcher;
use crate::engine::optim::{AdamW, AdamWConfig};
use crate::engine::parallel::World;
use crate::engine::rollout::{Rollout, RolloutTotals, SampleModel};

use super::checkpointing::CheckpointPolicy;
use super::early_stopping::EarlyStopping;
use super::ema::Ema;
use super::evaluation::PhaseEval;
use super::gradient::Objective;
use super::loss_scale::LossScaler;
use super::skip_guard::SkipGuard;
use super::stage_cursor::{ActiveStage, StagePlan};
use super::state::{BestState, PhaseState};
use super::Phase;

pub(super) use step::StepOutcome;

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
    /// What the on-policy steps since the last train record sampled.
    rollouts: RolloutTotals,
    /// The ranks training together.
    world: &'a World,
    /// Their time in collectives when the phase started.
    comm_at_start: f64,
    /// The loss scale, when the phase scales its loss (`train.loss_scale`).
    loss_scale: Option<LossScaler>,
}
impl<'a> PhaseRun<'a> {
    /// Sets the phase up, continuing from `phase.resume` when given.
    pub fn start(phase: Phase<'a>, data: &'a dyn DataSource) -> Result<Self> {
        let rollout = rollout_of(&phase)?;
        let plan = StagePlan::new(phase.label, phase.stages, phase.train)?;
        let device = student_device(phase.student)?;
        let train = phase.train;
        let batcher = TrainBatcher::new(
            data.tokens(Split::Train),
            train.batch_size,
            train.seq_len,
            train.windows.unwrap_or(WindowSampling::Random),
            phase.batch_seed,
            phase.world.shard(),
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
            objective: Objective::new(
                phase.label,
                phase.terms,
                phase.router,
                phase.student,
                phase.teacher,
                &train.lm_head,
                train.batch_size / phase.world.size() * train.seq_len,
                rollout,
                phase.world,
            )?,
            world: phase.world,
            comm_at_start: phase.world.comm_seconds(),
            batcher,
            eval: PhaseEval::new(
                phase.val,
                phase.val_teacher,
                phase.eval_every,
                plan.total(),
                phase.world,
            ),
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
            rollouts: RolloutTotals::default(),
            loss_scale: LossScaler::new(train.loss_scale, phase.student.compute_dtype()),
        };
        if let Some(ck) = phase.resume {
            run.resume_from(ck, &device)?;
        }
        Ok(run)
    }

    /// Puts back everything a checkpoint of this phase saved.
    fn resume_from(&mut self, mut ck: Checkpoint<PhaseState>, device: &Device) -> Result<()> {
        if ck.state.ranks != self.world.size() {
            return Err(Error::input(
                format!("checkpoint {}", ck.dir.display()),
                format!(
                    "was written by a run of {} rank(s), and this run has {}: resume it with the \
                     same number of ranks (each rank's rows of a batch depend on it)",
                    ck.state.ranks,
                    self.world.size()
                ),
            ));
        }
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
        self.rollouts = std::mem::take(&mut ck.state.rollouts);
        if self.loss_scale.is_some() {
            self.loss_scale = ck.state.loss_scale.or(self.loss_scale);
        }
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

    fn at(&self, stage: &str, step: usize) -> At {
        At {
            phase: self.label.to_string(),
            stage: stage.to_string(),
            step,
        }
    }
}

/// The sampler of the phase's on-policy steps: from the student, or from the teacher for
/// sequence-level KD.
fn rollout_of<'a>(phase: &Phase<'a>) -> Result<Option<Rollout<'a>>> {
    let Some(plan) = phase.on_policy else {
        return Ok(None);
    };
    let model = match (plan.seq_kd, phase.teacher) {
        (false, _) => SampleModel::Student(phase.student),
        (true, Some(t)) => SampleModel::Teacher(t),
        (true, None) => {
            return Err(Error::Runtime(format!(
                "phase `{}` samples from the teacher (on_policy.seq_kd) and has none",
                phase.label
            )))
        }
    };
    Ok(Some(Rollout::new(plan, model)))
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
