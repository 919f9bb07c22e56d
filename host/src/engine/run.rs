//! `retort run`: pretrain the teacher if needed, distill the student, train the scratch
//! baseline, evaluate all three, write the run directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use retort_core::{fsutil, Error, Observer, Params, Registry, Result, Scalar, Split, Student, TapSet, Teacher};

use crate::artifacts::checkpoint;
use crate::artifacts::report::{ModelReport, Report, RunInfo, TermReport, TrainReport};
use crate::artifacts::run_dir;
use crate::assemble::config::ConfigOrigin;
use crate::assemble::{build_lr_schedule, build_router, seeds, teacher_params_with_checkpoint, Pipeline, TeacherPlan};
use crate::engine::batching::val_batches;
use crate::engine::evaluate::{evaluate, EvalResult};
use crate::engine::phase::{train_phase, CheckpointPolicy, Phase, PhaseStats, Stage, TermSlot};

/// Options of `retort run` besides the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run directory; default `runs/<run.name>`.
    pub out: Option<PathBuf>,
    /// Replace a directory that holds another run.
    pub force: bool,
    /// Show progress bars.
    pub progress: bool,
    /// Continue the run in `out` from its last checkpoint instead of starting one.
    pub resume: bool,
    /// On resume, skip a corrupted newest checkpoint and use the previous good one.
    pub resume_from_last_good: bool,
}

/// `progress.json`: the phases a run has finished, with their statistics.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct RunProgress {
    completed: std::collections::BTreeMap<String, CompletedPhase>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CompletedPhase {
    stats: PhaseStats,
    metrics_len: u64,
}

impl RunProgress {
    fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("progress.json");
        if !p.is_file() {
            return Ok(RunProgress::default());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io("reading run progress", &p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::input(format!("run progress {}", p.display()), format!("corrupted: {e}")))
    }

    fn complete(&mut self, dir: &Path, label: &str, stats: &PhaseStats) -> Result<()> {
        let metrics_len = std::fs::metadata(dir.join("metrics.jsonl"))
            .map(|m| m.len())
            .unwrap_or(0);
        self.completed.insert(
            label.to_string(),
            CompletedPhase {
                stats: stats.clone(),
                metrics_len,
            },
        );
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Runtime(e.to_string()))?;
        fsutil::write_atomic(&dir.join("progress.json"), &json)
    }
}

fn truncate_metrics(dir: &Path, len: u64) -> Result<()> {
    let p = dir.join("metrics.jsonl");
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
        f.set_len(len)
            .map_err(|e| Error::io("truncating metrics to the checkpoint", &p, e))?;
        f.sync_all().map_err(|e| Error::io("syncing metrics", &p, e))?;
    }
    Ok(())
}

/// What a finished run produced.
pub struct RunOutcome {
    /// The run directory.
    pub dir: PathBuf,
    /// The report written there.
    pub report: Report,
}

fn ce_only(registry: &Registry, pipeline: &Pipeline) -> Result<Vec<TermSlot>> {
    let term = registry
        .losses
        .build("ce", &Params::empty("baseline.loss[0]"), &pipeline.context(0))?;
    Ok(vec![TermSlot {
        name: "ce".into(),
        weight: Scalar::Const(1.0),
        term,
    }])
}

/// Runs the whole pipeline.
pub fn run(mut pipeline: Pipeline, origin: &ConfigOrigin, opts: &RunOptions) -> Result<RunOutcome> {
    let started = Instant::now();
    let cfg = pipeline.config.clone();
    let teacher_loaded = pipeline.teacher.take();
    let registry = pipeline.registry;
    let dir = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.run.name));
    if opts.resume {
        if !dir.join("config.resolved.toml").is_file() {
            return Err(Error::input(
                format!("resume {}", dir.display()),
                "is not a retort run directory (no config.resolved.toml)",
            ));
        }
    } else {
        run_dir::prepare(&dir, opts.force)?;
        let resolved = toml::to_string_pretty(&cfg)
            .map_err(|e| Error::Runtime(format!("serializing the resolved config: {e}")))?;
        let header = format!("# Resolved config of this run (source: {}).\n", origin.label());
        fsutil::write_atomic(
            &dir.join("config.resolved.toml"),
            format!("{header}{resolved}").as_bytes(),
        )?;
    }
    let mut progress = if opts.resume {
        RunProgress::load(&dir)?
    } else {
        RunProgress::default()
    };
    let mut phases: Vec<&str> = Vec::new();
    if matches!(pipeline.teacher_plan, TeacherPlan::Pretrain { .. }) {
        phases.push("teacher");
    }
    phases.push("student");
    if cfg.eval.baseline {
        phases.push("baseline");
    }
    let mut resume_ck = None;
    if opts.resume {
        if let Some(next) = phases.iter().find(|p| !progress.completed.contains_key(**p)) {
            resume_ck = checkpoint::latest(
                &dir.join("checkpoints").join(next),
                &pipeline.device,
                opts.resume_from_last_good,
            )?;
            let len = match &resume_ck {
                Some(c) => c.state.metrics_len,
                None => progress.completed.values().map(|c| c.metrics_len).max().unwrap_or(0),
            };
            truncate_metrics(&dir, len)?;
        }
    }
    let mut take_resume = |label: &str| resume_ck.take_if(|c| c.state.phase == label);
    let policy = |label: &str| {
        Some(CheckpointPolicy {
            root: dir.join("checkpoints").join(label),
            every: cfg.train.checkpoint_every,
            keep: cfg.train.keep_checkpoints,
            metrics: Some(dir.join("metrics.jsonl")),
        })
    };

    let mut octx = pipeline.context(cfg.run.seed);
    octx.run_dir = Some(dir.clone());
    let mut observers: Vec<Box<dyn Observer>> = cfg
        .observers
        .iter()
        .enumerate()
        .map(|(i, o)| {
            registry
                .observers
                .build(&o.kind, &o.params_at(&format!("observers[{i}]")), &octx)
        })
        .collect::<Result<_>>()?;

    let data = pipeline.data.as_ref();
    tracing::info!("data: {}", data.describe());
    let val = val_batches(
        data.tokens(Split::Val),
        cfg.eval.batches,
        cfg.eval.batch_size,
        cfg.train.seq_len,
        &pipeline.device,
    )?;

    // 1. Teacher.
    let (teacher, teacher_train): (Box<dyn Teacher>, Option<PhaseStats>) = match &pipeline.teacher_plan {
        TeacherPlan::Load => {
            let t = teacher_loaded.ok_or_else(|| Error::Runtime("the assembled pipeline holds no teacher".into()))?;
            (t, None)
        }
        TeacherPlan::Pretrain { .. } if progress.completed.contains_key("teacher") => {
            let t = pipeline.build_teacher(&teacher_params_with_checkpoint(&cfg, &dir.join("teacher")))?;
            (t, Some(progress.completed["teacher"].stats.clone()))
        }
        TeacherPlan::Pretrain { steps, lr } => {
            let ctx = pipeline.context(seeds::teacher_init(cfg.run.seed));
            let model = registry.students.build(
                &cfg.teacher.kind,
                &Params::new("teacher", cfg.teacher.params.clone()),
                &ctx,
            )?;
            tracing::info!("pretraining teacher: {} for {steps} steps", model.describe());
            let terms = ce_only(registry, &pipeline)?;
            let stats = train_phase(
                Phase {
                    label: "teacher",
                    student: model.as_ref(),
                    teacher: None,
                    terms: &terms,
                    router: registry.routers.build("static", &Params::empty("router"), &ctx)?,
                    stages: vec![Stage::whole(
                        *steps,
                        lr.build("teacher.pretrain.lr", &ctx)?,
                        build_lr_schedule(&cfg, registry, &ctx)?,
                        &cfg.train,
                    )],
                    train: &cfg.train,
                    batch_seed: seeds::teacher_batches(cfg.run.seed),
                    val: &val,
                    val_teacher: None,
                    early_stopping: None,
                    checkpoints: policy("teacher"),
                    resume: take_resume("teacher"),
                    progress_bar: opts.progress,
                },
                data,
                &mut observers,
            )?;
            let tdir = dir.join("teacher");
            crate::assemble::vocab::save_with_tokenizer(model.as_ref(), &tdir, data.tokenizer())?;
            progress.complete(&dir, "teacher", &stats)?;
            let t = pipeline.build_teacher(&teacher_params_with_checkpoint(&cfg, &tdir))?;
            (t, Some(stats))
        }
    };
    let teacher_logits: Vec<Tensor> = val
        .iter()
        .map(|b| crate::engine::evaluate::teacher_eval_logits(teacher.as_ref(), b))
        .collect::<Result<_>>()?;
    let teacher_eval = evaluate(&|i, _| Ok(teacher_logits[i].clone()), &val, None)?;
    tracing::info!("teacher val loss {:.4}", teacher_eval.val_loss);

    // 2. Distilled student, 3. scratch baseline: same init, same batches, same budget.
    let mut train_student =
        |label: &'static str, terms: &[TermSlot], distill: bool| -> Result<(Box<dyn Student>, PhaseStats)> {
            if let Some(done) = progress.completed.get(label) {
                let mut params = cfg.student.params.clone();
                // The saved weights replace any initialisation recipe.
                params.remove("init");
                params.insert(
                    "checkpoint".into(),
                    serde_json::Value::String(dir.join(label).display().to_string()),
                );
                let s = registry.students.build(
                    &cfg.student.kind,
                    &Params::new("student", params),
                    &pipeline.context(cfg.run.seed),
                )?;
                let s = crate::assemble::vocab::fit_student(s, pipeline.vocab_size)?;
                return Ok((s, done.stats.clone()));
            }
            let ctx = pipeline.context(seeds::student_init(cfg.run.seed));
            let student = pipeline.build_student(seeds::student_init(cfg.run.seed))?;
            tracing::info!(
                "training {label}: {} for {} steps",
                student.describe(),
                pipeline.student_steps()
            );
            let (router, stages) = if distill {
                (build_router(&cfg, registry, &ctx)?, pipeline.student_stages(&ctx)?)
            } else {
                // The baseline: the same budget in one stage of `[train]` (a stage that trains
                // only the distillation projections has no meaning without a teacher).
                (
                    registry.routers.build("static", &Params::empty("router"), &ctx)?,
                    vec![Stage::whole(
                        pipeline.student_steps(),
                        cfg.train.lr.build("train.lr", &ctx)?,
                        build_lr_schedule(&cfg, registry, &ctx)?,
                        &cfg.train,
                    )],
                )
            };
            let stats = train_phase(
                Phase {
                    label,
                    student: student.as_ref(),
                    teacher: Some(teacher.as_ref()),
                    terms,
                    router,
                    stages,
                    train: &cfg.train,
                    batch_seed: seeds::student_batches(cfg.run.seed),
                    val: &val,
                    val_teacher: Some(&teacher_logits),
                    early_stopping: cfg.train.early_stopping.as_ref(),
                    checkpoints: policy(label),
                    resume: take_resume(label),
                    progress_bar: opts.progress,
                },
                data,
                &mut observers,
            )?;
            crate::assemble::vocab::save_with_tokenizer(student.as_ref(), &dir.join(label), data.tokenizer())?;
            progress.complete(&dir, label, &stats)?;
            Ok((student, stats))
        };
    let (student, student_train) = train_student("student", &pipeline.terms, true)?;
    let eval_student = |s: &dyn Student| -> Result<EvalResult> {
        evaluate(
            &|_, b| Ok(s.forward(b, &TapSet::none())?.logits),
            &val,
            Some(&teacher_logits),
        )
    };
    let student_eval = eval_student(student.as_ref())?;
    let baseline = if cfg.eval.baseline {
        let terms = ce_only(registry, &pipeline)?;
        let (b, stats) = train_student("baseline", &terms, false)?;
        Some((eval_student(b.as_ref())?, b.describe(), b.num_params(), stats))
    } else {
        None
    };

    let tl = Some(teacher_eval.val_loss);
    let report = Report {
        run: RunInfo {
            name: cfg.run.name.clone(),
            seed: cfg.run.seed,
            device: cfg.run.device.clone(),
            dir: dir.display().to_string(),
            config: origin.label(),
        },
        data: data.describe(),
        objective: cfg
            .loss
            .iter()
            .zip(&pipeline.terms)
            .map(|(spec, slot)| TermReport {
                name: slot.name.clone(),
                kind: spec.kind.clone(),
                weight: spec.weight.clone(),
            })
            .collect(),
        teacher: ModelReport::new(
            teacher.describe(),
            teacher.num_params(),
            &teacher_eval,
            None,
            teacher_train.as_ref().map(TrainReport::from),
        ),
        student: ModelReport::new(
            student.describe(),
            student.num_params(),
            &student_eval,
            tl,
            Some(TrainReport::from(&student_train)),
        ),
        baseline: baseline
            .as_ref()
            .map(|(e, d, p, s)| ModelReport::new(d.clone(), *p, e, tl, Some(TrainReport::from(s)))),
        train: TrainReport::from(&student_train),
        distillation_gain: baseline.as_ref().map(|(e, ..)| e.val_loss - student_eval.val_loss),
        eval_tokens: student_eval.tokens,
        total_wall_s: started.elapsed().as_secs_f64(),
    };
    report.write(&dir)?;
    // Charts are a convenience: a failure to draw is reported, never fatal to a finished run.
    if let Err(e) = crate::artifacts::plots::plot_and_embed(&dir) {
        tracing::warn!(
            "the run's charts could not be drawn: {e} (retry with `retort plot {}`)",
            dir.display()
        );
    }
    let summary = serde_json::json!({"event": "report", "report": &report});
    for o in observers.iter_mut() {
        o.record(&summary)?;
        o.finish()?;
    }
    Ok(RunOutcome { dir, report })
}
