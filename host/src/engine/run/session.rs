//! A run in progress: its directory, its finished phases, the checkpoint it resumes from, its
//! recorder and validation windows; trains each phase or takes it from a previous process.

use std::path::PathBuf;

use candle_core::Tensor;

use retort_core::{Batch, Error, Observer, Result, Split, Student, TapSet, Teacher};

use crate::artifacts::checkpoint::{self, Checkpoint};
use crate::artifacts::events::{Event, Recorder, ReportRecord};
use crate::artifacts::export::save_with_tokenizer;
use crate::artifacts::progress::RunProgress;
use crate::artifacts::report::{EvalResult, GenerationResult, PhaseStats, Report};
use crate::artifacts::run_dir::RunDir;
use crate::assemble::config::ConfigOrigin;
use crate::assemble::{PhaseSetup, Pipeline};
use crate::engine::batching::val_batches;
use crate::engine::evaluate::{evaluate_in, teacher_eval_logits};
use crate::engine::generation_eval::GenerationEval;
use crate::engine::parallel::World;
use crate::engine::phase::{train_phase, CheckpointPolicy, Phase, PhaseState};
use crate::engine::rollout::SampleModel;

use super::inputs::run_inputs;
use super::RunOptions;

/// The teacher of the run, with its logits on the validation windows.
pub(super) struct TeacherOutcome {
    /// The frozen teacher.
    pub model: Box<dyn Teacher>,
    /// How it was pretrained in this run (`None`: loaded from its params).
    pub stats: Option<PhaseStats>,
    /// Its logits on each validation batch.
    pub val_logits: Vec<Tensor>,
    /// Its evaluation.
    pub eval: EvalResult,
    /// What it generates, scored.
    pub generation: Option<GenerationResult>,
}

/// A trained student (or baseline) and its evaluation.
pub(super) struct StudentOutcome {
    /// The model, with its final weights.
    pub model: Box<dyn Student>,
    /// How it trained.
    pub stats: PhaseStats,
    /// Its evaluation against the teacher.
    pub eval: EvalResult,
    /// What it generates, scored.
    pub generation: Option<GenerationResult>,
}

/// A run in progress.
pub(super) struct Session<'p, 'r> {
    pipeline: &'p Pipeline<'r>,
    dir: RunDir,
    progress: RunProgress,
    resume: Option<Checkpoint<PhaseState>>,
    recorder: Recorder,
    val: Vec<Batch>,
    generation: Option<GenerationEval<'p>>,
    options: RunOptions,
    /// The ranks running this session.
    world: &'p World,
}

impl<'p, 'r> Session<'p, 'r> {
    /// Creates the run directory (or reopens it to resume: the finished phases, the newest
    /// checkpoint of the next one, the metrics cut back to it), the observers and the
    /// validation windows.
    pub fn open(
        pipeline: &'p Pipeline<'r>,
        origin: &ConfigOrigin,
        opts: &RunOptions,
        world: &'p World,
    ) -> Result<Self> {
        let cfg = &pipeline.config;
        let data = pipeline.data.as_ref();
        tracing::info!("data: {}", data.describe());
        let (eval, seq_len) = (&cfg.eval, cfg.train.seq_len);
        // Everything that can refuse the run does so before the directory is touched.
        let val = val_batches(
            data.tokens(Split::Val),
            eval.batches,
            eval.batch_size,
            seq_len,
            &pipeline.device,
        )?;
        // Each rank evaluates every `world.size()`-th validation batch; the sums are reduced.
        let val: Vec<Batch> = val.into_iter().skip(world.rank()).step_by(world.size()).collect();
        let path = match &opts.resume {
            Some(path) => path.clone(),
            None => opts
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.run.name)),
        };
        let opened = match (world.is_root(), &opts.resume) {
            (true, Some(_)) => Some(reopen(pipeline, &path, opts.resume_from_last_good)?),
            (true, None) => {
                let dir = RunDir::create(&path, opts.force, cfg, &origin.label(), &run_inputs(pipeline)?)?;
                Some((dir, RunProgress::default(), None))
            }
            (false, _) => None,
        };
        // The other ranks read the directory once rank 0 has created or reopened it.
        world.barrier()?;
        let (dir, progress, resume) = match opened {
            Some(opened) => opened,
            None => follow(pipeline, &path, opts.resume_from_last_good)?,
        };
        let recorder = match world.is_root() {
            true => Recorder::new(observers(pipeline, &dir)?),
            false => Recorder::none(),
        };
        let generation = pipeline.generation.as_ref().map(|plan| {
            let val = data.tokens(Split::Val);
            GenerationEval::new(
                plan,
                val,
                seq_len,
                eval.batch_size,
                data.likelihood(),
                pipeline.device.clone(),
            )
        });
        Ok(Session {
            pipeline,
            dir,
            progress,
            resume,
            recorder,
            val,
            generation,
            options: opts.clone(),
            world,
        })
    }

    /// The run directory.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// The teacher: the one loaded at assembly, the one a previous process pretrained, or
    /// pretrained now; then its logits and its evaluation on the validation windows.
    pub fn obtain_teacher(&mut self, loaded: Option<Box<dyn Teacher>>) -> Result<TeacherOutcome> {
        let (model, stats) = match (loaded, self.progress.completed("teacher").cloned()) {
            (Some(t), _) => (t, None),
            (None, Some(stats)) => (
                self.pipeline.pretrained_teacher(&self.dir.model("teacher"))?,
                Some(stats),
            ),
            (None, None) => self.pretrain_teacher()?,
        };
        let val_logits: Vec<Tensor> = self
            .val
            .iter()
            .map(|b| teacher_eval_logits(model.as_ref(), b))
            .collect::<Result<_>>()?;
        let eval = evaluate_in(&|i, _| Ok(val_logits[i].clone()), &self.val, None, self.world)?;
        tracing::info!("teacher val loss {:.4}", eval.val_loss);
        let generation = self.generations("teacher", SampleModel::Teacher(model.as_ref()), model.as_ref())?;
        Ok(TeacherOutcome {
            model,
            stats,
            val_logits,
            eval,
            generation,
        })
    }

    fn pretrain_teacher(&mut self) -> Result<(Box<dyn Teacher>, Option<PhaseStats>)> {
        let setup = self
            .pipeline
            .teacher_pretraining()?
            .ok_or_else(|| Error::Runtime("the assembled pipeline holds no teacher".into()))?;
        let steps: usize = setup.stages.iter().map(|s| s.steps).sum();
        tracing::info!("pretraining teacher: {} for {steps} steps", setup.model.describe());
        let (model, stats) = self.train(setup, None)?;
        let dir = self.dir.model("teacher");
        if self.writes() {
            save_with_tokenizer(model.as_ref(), &dir, self.pipeline.data.tokenizer())?;
            self.progress.complete(&self.dir, "teacher", &stats)?;
        }
        // Every rank loads the teacher rank 0 wrote.
        self.world.barrier()?;
        Ok((self.pipeline.pretrained_teacher(&dir)?, Some(stats)))
    }

    /// The student (or baseline) of `setup`, trained now or taken from a previous process that
    /// finished it, and evaluated against the teacher.
    pub fn train_student(&mut self, setup: PhaseSetup, teacher: &TeacherOutcome) -> Result<StudentOutcome> {
        let label = setup.label;
        let (model, stats) = match self.progress.completed(label).cloned() {
            Some(stats) => (self.pipeline.trained_student(&self.dir.model(label))?, stats),
            None => {
                let steps = self.pipeline.student_steps();
                tracing::info!("training {label}: {} for {steps} steps", setup.model.describe());
                let (model, stats) = self.train(setup, Some(teacher))?;
                if self.writes() {
                    save_with_tokenizer(model.as_ref(), &self.dir.model(label), self.pipeline.data.tokenizer())?;
                    self.progress.complete(&self.dir, label, &stats)?;
                }
                (model, stats)
            }
        };
        let eval = evaluate_in(
            &|_, b| Ok(model.forward(b, &TapSet::none())?.logits),
            &self.val,
            Some(&teacher.val_logits),
            self.world,
        )?;
        let generation = self.generations(label, SampleModel::Student(model.as_ref()), teacher.model.as_ref())?;
        Ok(StudentOutcome {
            model,
            stats,
            eval,
            generation,
        })
    }

    /// What `model` generates, scored by `teacher`, when the run evaluates generations.
    fn generations(&self, label: &str, model: SampleModel, teacher: &dyn Teacher) -> Result<Option<GenerationResult>> {
        let Some(g) = &self.generation else {
            return Ok(None);
        };
        let r = g.score(model, teacher)?;
        tracing::info!(
            "{label} generations: {} samples, mean length {:.1}, teacher NLL {}, true NLL {}",
            r.samples,
            r.completion_len,
            r.teacher_nll.map_or("-".into(), |x| format!("{x:.4}")),
            r.true_nll.map_or("-".into(), |x| format!("{x:.4}"))
        );
        Ok(Some(r))
    }

    /// Trains the phase of `setup` (continuing from the resumed checkpoint when it is this
    /// phase's).
    fn train(&mut self, setup: PhaseSetup, teacher: Option<&TeacherOutcome>) -> Result<(Box<dyn Student>, PhaseStats)> {
        let cfg = &self.pipeline.config;
        let label = setup.label;
        let teacher = teacher.filter(|_| setup.with_teacher);
        let stats = train_phase(
            Phase {
                label,
                student: setup.model.as_ref(),
                teacher: teacher.map(|t| t.model.as_ref()),
                terms: setup.terms,
                router: setup.router,
                stages: setup.stages,
                train: &cfg.train,
                batch_seed: setup.batch_seed,
                val: &self.val,
                val_teacher: teacher.map(|t| t.val_logits.as_slice()),
                eval_every: setup.eval_every,
                early_stopping: setup.early_stopping,
                checkpoints: Some(CheckpointPolicy {
                    root: self.dir.checkpoints(label),
                    run_id: self.dir.run_id().to_string(),
                    every: cfg.train.checkpoint_every,
                    keep: cfg.train.keep_checkpoints,
                    metrics: self.writes().then(|| self.dir.metrics()),
                    writes: self.writes(),
                }),
                resume: self.resume.take_if(|c| c.state.phase == label),
                progress_bar: self.options.progress,
                on_policy: setup.on_policy,
                world: self.world,
            },
            self.pipeline.data.as_ref(),
            &mut self.recorder,
        )?;
        Ok((setup.model, stats))
    }

    /// Whether this process writes the run directory (rank 0 of a data-parallel run).
    fn writes(&self) -> bool {
        self.world.is_root()
    }

    /// Writes the report and its charts, records it and closes the observers (rank 0).
    pub fn finish(&mut self, report: &Report) -> Result<()> {
        if !self.writes() {
            return self.recorder.finish();
        }
        report.write(self.dir.path())?;
        // Charts are a convenience: a failure to draw is reported, never fatal to a finished run.
        if let Err(e) = crate::artifacts::plots::plot_and_embed(self.dir.path()) {
            tracing::warn!(
                "the run's charts could not be drawn: {e} (retry with `retort plot {}`)",
                self.dir.path().display()
            );
        }
        self.recorder
            .record(&Event::Report(Box::new(ReportRecord { report: report.clone() })))?;
        self.recorder.finish()
    }
}

/// A run directory to resume: its progress, the newest checkpoint of the first phase not
/// finished, and its metrics cut back to what that checkpoint (or the last finished phase) saw.
fn reopen(
    pipeline: &Pipeline,
    path: &std::path::Path,
    last_good: bool,
) -> Result<(RunDir, RunProgress, Option<Checkpoint<PhaseState>>)> {
    let dir = RunDir::open(path)?;
    dir.verify_inputs(&run_inputs(pipeline)?)?;
    let progress = RunProgress::load(&dir)?;
    let next = pipeline.phases().into_iter().find(|p| progress.completed(p).is_none());
    let Some(next) = next else {
        // A finished run: its metrics are still checked and cut back to the last phase's end.
        dir.restore_metrics(&progress.metrics_mark())?;
        return Ok((dir, progress, None));
    };
    checkpoint::recover(&dir.checkpoints(next))?;
    let resume: Option<Checkpoint<PhaseState>> =
        checkpoint::latest(&dir.checkpoints(next), &pipeline.device, last_good)?;
    if let Some(c) = &resume {
        if c.state.run_id != dir.run_id() {
            return Err(Error::input(
                format!("resume from checkpoint {}", c.dir.display()),
                format!(
                    "was written by run {}, not by the run in this directory ({}); remove it",
                    c.state.run_id,
                    dir.run_id()
                ),
            ));
        }
    }
    let mark = match &resume {
        Some(c) => c.state.metrics.clone(),
        None => progress.metrics_mark(),
    };
    dir.restore_metrics(&mark)?;
    Ok((dir, progress, resume))
}

/// The run directory rank 0 created or reopened, as another rank reads it: the finished
/// phases and the checkpoint the next one resumes from (rank 0 has recovered it already).
fn follow(
    pipeline: &Pipeline,
    path: &std::path::Path,
    last_good: bool,
) -> Result<(RunDir, RunProgress, Option<Checkpoint<PhaseState>>)> {
    let dir = RunDir::read(path)?;
    let progress = RunProgress::load(&dir)?;
    let resume = match pipeline.phases().into_iter().find(|p| progress.completed(p).is_none()) {
        Some(next) => checkpoint::latest(&dir.checkpoints(next), &pipeline.device, last_good)?,
        None => None,
    };
    Ok((dir, progress, resume))
}

/// The configured observers, writing into the run directory.
fn observers(pipeline: &Pipeline, dir: &RunDir) -> Result<Vec<Box<dyn Observer>>> {
    crate::assemble::observers::build(
        &pipeline.config,
        &pipeline.context(pipeline.config.run.seed),
        dir.path(),
    )
}
