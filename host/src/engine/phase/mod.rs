//! The training loop shared by teacher pretraining, distillation and the scratch baseline.
//!
//! One step: batch -> teacher forward (no grad, only if a term needs it) -> student forward
//! (with the taps the terms asked for) -> each term -> router weights ->
//! `total = sum_i w_i * term_i` -> backward -> AdamW (clipped) -> metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use retort_core::config::{EarlyStoppingMetric, EarlyStoppingSpec, ParamGroupSpec, TrainSection};
use retort_core::{
    Batch, DataSource, Error, LossTerm, Observer, Progress, Result, Router, Scalar, Schedule, Split, StepContext,
    Student, TapSet, Teacher, TermSignals,
};

use crate::artifacts::checkpoint::{self, EarlyState, LoadedCheckpoint, PhaseState};
use crate::engine::batching::TrainBatcher;
use crate::engine::evaluate::{evaluate, EvalResult};
use crate::engine::optim::{assign_groups, AdamW, AdamWConfig};

/// A loss term with its metrics name and configured weight.
pub struct TermSlot {
    /// Name in metrics.
    pub name: String,
    /// Configured weight (a number or a schedule).
    pub weight: Scalar,
    /// The term.
    pub term: Box<dyn LossTerm>,
}

/// One stretch of a phase with its own optimizer, learning rate and loss weights
/// (`[[stages]]`; a phase without stages is one stage built by [`Stage::whole`]).
pub struct Stage {
    /// Name in metrics and reports.
    pub name: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (number or schedule over the stage), times `lr_schedule`.
    pub lr: Scalar,
    /// Factor on the learning rate over the stage.
    pub lr_schedule: Box<dyn Schedule>,
    /// Parameter groups of the stage.
    pub param_groups: Vec<ParamGroupSpec>,
    /// Key path of `param_groups` in the config, for errors.
    pub groups_key: String,
    /// Default decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm clip (0: off).
    pub grad_clip: f64,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Weights of the terms for this stage (`None`: each term's configured weight).
    pub weights: Option<Vec<Scalar>>,
}

impl Stage {
    /// The single stage of a phase that `[train]` describes as it is.
    pub fn whole(steps: usize, lr: Scalar, lr_schedule: Box<dyn Schedule>, train: &TrainSection) -> Stage {
        Stage {
            name: "main".into(),
            steps,
            lr,
            lr_schedule,
            param_groups: train.param_groups.clone(),
            groups_key: "train.param_groups".into(),
            weight_decay: train.weight_decay,
            grad_clip: train.grad_clip,
            grad_accum: train.grad_accum.max(1),
            weights: None,
        }
    }

    fn tokens_per_step(&self, train: &TrainSection) -> usize {
        train.batch_size * train.seq_len * self.grad_accum.max(1)
    }
}

/// One training phase (`teacher`, `student` or `baseline`).
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
    /// Batch size, window, EMA and logging settings.
    pub train: &'a TrainSection,
    /// Seed of the batch sequence.
    pub batch_seed: u64,
    /// Validation batches for periodic evaluation.
    pub val: &'a [Batch],
    /// The teacher's logits on `val` (one tensor per batch), for agreement and KL in evaluations.
    pub val_teacher: Option<&'a [Tensor]>,
    /// Early stopping, if on for this phase.
    pub early_stopping: Option<&'a EarlyStoppingSpec>,
    /// Periodic resumable checkpoints, if any.
    pub checkpoints: Option<CheckpointPolicy>,
    /// A checkpoint of this phase to continue from.
    pub resume: Option<LoadedCheckpoint>,
    /// Show a progress bar.
    pub progress_bar: bool,
}

/// Where and how often a phase writes resumable checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// `checkpoints/<phase>` of the run.
    pub root: PathBuf,
    /// Every this many steps.
    pub every: usize,
    /// Keep the newest this many.
    pub keep: usize,
    /// The metrics file whose length each checkpoint records (truncated to it on resume).
    pub metrics: Option<PathBuf>,
}

/// What one stage did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Stage name.
    pub name: String,
    /// Steps run (fewer than planned if early stopping ended the phase).
    pub steps: usize,
    /// First step of the stage within the phase (0-based).
    pub first_step: usize,
    /// Peak learning rate at the stage's start (before the schedule factor).
    pub lr: f64,
    /// Parameters the optimizer updated in this stage (the rest were frozen).
    pub trainable_params: usize,
    /// Mean total loss over the stage's last (up to) 10 applied steps.
    pub final_loss: Option<f64>,
    /// Validation loss at the end of the stage (multi-stage phases only).
    pub val_loss: Option<f64>,
}

/// The best evaluation of a phase under early stopping.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BestEval {
    /// Metric name.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// Step (of the phase) at which it was measured.
    pub step: usize,
}

/// What a phase did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PhaseStats {
    /// Steps of the phase run (skipped ones included).
    pub steps: usize,
    /// Steps skipped for a non-finite loss or gradient (no update).
    pub skipped: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// Wall time in seconds (of the last process, for a resumed phase).
    pub wall_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Total loss of every step.
    pub losses: Vec<f64>,
    /// Per stage.
    #[serde(default)]
    pub stages: Vec<StageStats>,
    /// The best evaluation kept and exported (early stopping on).
    #[serde(default)]
    pub best: Option<BestEval>,
    /// Step at which early stopping ended the phase, if it did.
    #[serde(default)]
    pub stopped_early_at: Option<usize>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn record(observers: &mut [Box<dyn Observer>], rec: &serde_json::Value) -> Result<()> {
    for o in observers.iter_mut() {
        o.record(rec)?;
    }
    Ok(())
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

fn metric_of(r: &EvalResult, m: EarlyStoppingMetric) -> Result<f64> {
    let v = match m {
        EarlyStoppingMetric::ValLoss => Some(r.val_loss),
        EarlyStoppingMetric::KlToTeacher => r.kl_to_teacher,
        EarlyStoppingMetric::Top1Agreement => r.top1_agreement,
    };
    v.ok_or_else(|| {
        Error::Runtime(format!(
            "early stopping watches `{}`, which this phase cannot measure (no teacher logits)",
            m.name()
        ))
    })
}

/// Early stopping's bookkeeping.
struct Early<'a> {
    spec: &'a EarlyStoppingSpec,
    state: EarlyState,
    /// The best evaluated weights, in `model_vars` order.
    weights: Option<Vec<Tensor>>,
}

impl Early<'_> {
    /// Whether `value` improves on the best by more than `min_delta`.
    fn improves(&self, value: f64) -> bool {
        match self.state.best {
            None => value.is_finite(),
            Some(best) if self.spec.metric.higher_is_better() => value > best + self.spec.min_delta,
            Some(best) => value < best - self.spec.min_delta,
        }
    }
}

/// Runs `phase` over the training split of `data`, sending records to `observers`, on
/// retort's rayon pool ([`crate::engine::pool`]).
pub fn train_phase(phase: Phase, data: &dyn DataSource, observers: &mut [Box<dyn Observer>]) -> Result<PhaseStats> {
    crate::engine::pool::on_pool(|| train_phase_here(phase, data, observers))
}

/// [`train_phase`] on the calling thread.
fn train_phase_here(phase: Phase, data: &dyn DataSource, observers: &mut [Box<dyn Observer>]) -> Result<PhaseStats> {
    let Phase {
        label,
        student,
        teacher,
        terms,
        mut router,
        stages,
        train,
        batch_seed,
        val,
        val_teacher,
        early_stopping,
        checkpoints,
        resume,
        progress_bar,
    } = phase;
    if stages.is_empty() {
        return Err(Error::Runtime(format!("phase `{label}` has no stages")));
    }
    let device = student_device(student)?;
    let mut batcher = TrainBatcher::new(
        data.tokens(Split::Train),
        train.batch_size,
        train.seq_len,
        train.windows.unwrap_or(retort_core::config::WindowSampling::Random),
        batch_seed,
        &device,
    )?;
    // The student's parameters and those the terms own (projections), optimised together.
    let mut vars = student.vars();
    for slot in terms {
        vars.extend(
            slot.term
                .vars()
                .into_iter()
                .map(|(n, v)| (format!("loss.{}.{n}", slot.name), v)),
        );
    }
    let all_vars = vars;
    // EMA of the model's own weights (not of the terms' projections).
    let model_vars = student.vars();
    let mut ema: Option<Vec<Tensor>> = match train.ema_decay {
        Some(_) => Some(
            model_vars
                .iter()
                .map(|(_, v)| v.as_tensor().detach().copy())
                .collect::<candle_core::Result<_>>()?,
        ),
        None => None,
    };
    let mut early = early_stopping.map(|spec| Early {
        spec,
        state: EarlyState {
            metric: spec.metric.name().into(),
            best: None,
            best_step: 0,
            bad_evals: 0,
        },
        weights: None,
    });
    let student_taps: TapSet = terms.iter().flat_map(|t| t.term.student_taps()).collect();
    let teacher_taps: TapSet = terms.iter().flat_map(|t| t.term.teacher_taps()).collect();
    let needs_teacher = terms.iter().any(|t| t.term.needs_teacher());
    if needs_teacher && teacher.is_none() {
        return Err(Error::Runtime(format!(
            "phase `{label}` has a term that needs a teacher, and none was given"
        )));
    }
    let names: Vec<String> = terms.iter().map(|t| t.name.clone()).collect();
    let reads_features: Vec<bool> = terms.iter().map(|t| !t.term.student_taps().is_empty()).collect();

    let total_steps: usize = stages.iter().map(|s| s.steps).sum();
    let stage_starts: Vec<usize> = stages
        .iter()
        .scan(0usize, |acc, s| {
            let start = *acc;
            *acc += s.steps;
            Some(start)
        })
        .collect();
    let tokens_at = |step: usize| -> usize {
        stages
            .iter()
            .zip(&stage_starts)
            .map(|(s, &start)| step.saturating_sub(start).min(s.steps) * s.tokens_per_step(train))
            .sum()
    };
    let multi_stage = stages.len() > 1;

    let bar = if progress_bar {
        ProgressBar::new(total_steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .map_err(|e| Error::Runtime(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(label);

    let start = Instant::now();
    let mut losses = Vec::with_capacity(total_steps);
    let (mut skipped, mut consecutive_skips) = (0usize, 0usize);
    let mut first_step = 0;
    let mut stage_stats: Vec<StageStats> = Vec::new();
    let mut resume_optimizer: Option<(HashMap<String, Tensor>, i32)> = None;
    if let Some(ck) = resume {
        for ((_, var), t) in all_vars.iter().zip(ck.tensors_of(&all_vars)?) {
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        if let Some(e) = ema.as_mut() {
            for ((name, _), slot) in model_vars.iter().zip(e.iter_mut()) {
                *slot = ck.model.get(&format!("ema.{name}")).cloned().ok_or_else(|| {
                    Error::input(
                        format!("checkpoint {}", ck.dir.display()),
                        format!("EMA tensor `ema.{name}` is missing"),
                    )
                })?;
            }
        }
        let pos: u128 = ck.state.batch_stream_pos.parse().map_err(|_| {
            Error::input(
                format!("checkpoint {}", ck.dir.display()),
                "state.json: bad batch_stream_pos",
            )
        })?;
        batcher.set_stream_pos(pos);
        router.restore(&ck.state.router)?;
        losses = ck.state.losses.clone();
        stage_stats = ck.state.stages.clone();
        (skipped, consecutive_skips, first_step) = (ck.state.skipped, ck.state.consecutive_skips, ck.state.step);
        if let (Some(e), Some(state)) = (early.as_mut(), ck.state.early.clone()) {
            e.state = state;
            if let Some(policy) = &checkpoints {
                // The best weights on disk belong to this record only if written at its step
                // (a later best, written after this checkpoint, is found again on the way).
                if let Some(best) = checkpoint::load_best(&policy.root, &device)? {
                    if best.state.step == e.state.best_step {
                        e.weights = Some(best.tensors_of(&model_vars)?);
                    }
                }
            }
        }
        resume_optimizer = Some((ck.optimizer, ck.state.adam_t));
        tracing::info!("{label}: resumed at step {first_step} from {}", ck.dir.display());
        bar.set_position(first_step as u64);
    }

    let mut stopped_early_at = None;
    'stages: for (si, stage) in stages.iter().enumerate() {
        let stage_start = stage_starts[si];
        let stage_end = stage_start + stage.steps;
        if first_step >= stage_end {
            continue;
        }
        let offset = first_step.saturating_sub(stage_start);
        let (grouped, groups) = assign_groups(
            all_vars.clone(),
            &stage.param_groups,
            stage.weight_decay,
            &stage.groups_key,
        )?;
        let trainable_params: usize = groups.iter().filter(|g| g.lr_mult > 0.0).map(|g| g.parameters).sum();
        let mut opt = AdamW::new(
            grouped,
            groups.len(),
            AdamWConfig {
                beta1: train.beta1,
                beta2: train.beta2,
                eps: train.eps,
                weight_decay: stage.weight_decay,
                grad_clip: stage.grad_clip,
            },
        )?;
        if offset > 0 {
            // Continuing inside this stage: its optimizer state is in the checkpoint. (At a
            // stage's first step the optimizer starts fresh, as in an uninterrupted run.)
            if let Some((state, t)) = resume_optimizer.take() {
                opt.import_state(&state, t)?;
            }
        } else {
            let stage_lr = stage.lr.at(Progress::new(0, stage.steps));
            for g in &groups {
                tracing::info!(
                    "{label} stage {} param group {:<28} tensors {:>3} parameters {:>9} lr x{} weight decay {}",
                    stage.name,
                    g.pattern,
                    g.tensors,
                    g.parameters,
                    g.lr_mult,
                    g.weight_decay
                );
            }
            // (A phase resumed mid-stage logged its groups before the checkpoint.)
            record(
                observers,
                &json!({"event": "param_groups", "phase": label, "stage": stage.name, "step": stage_start,
                        "steps": stage.steps, "lr": stage_lr, "groups": &groups}),
            )?;
            stage_stats.push(StageStats {
                name: stage.name.clone(),
                steps: 0,
                first_step: stage_start,
                lr: stage_lr,
                trainable_params,
                final_loss: None,
                val_loss: None,
            });
        }
        let accum = stage.grad_accum.max(1);
        for k in offset..stage.steps {
            let step = stage_start + k;
            let progress = Progress::new(k, stage.steps);
            let done = step + 1;
            let base_weights: Vec<f64> = match &stage.weights {
                Some(w) => w.iter().map(|w| w.at(progress)).collect(),
                None => terms.iter().map(|t| t.weight.at(progress)).collect(),
            };
            let mut weights: Option<Vec<f64>> = None;
            let mut mean_values = vec![0.0f64; terms.len()];
            let mut acc: Option<Vec<Tensor>> = None;
            // The first non-finite quantity of the step: (what, value).
            let mut bad: Option<(String, f64)> = None;
            for _micro in 0..accum {
                let batch = batcher.next_batch()?;
                if bad.is_some() {
                    continue; // keep the batch stream aligned; nothing of this step is applied
                }
                let t_out = match (needs_teacher, teacher) {
                    (true, Some(t)) => Some(t.forward(&batch, &teacher_taps)?),
                    _ => None,
                };
                let s_out = student.forward(&batch, &student_taps)?;
                let mut ctx = StepContext {
                    batch: &batch,
                    student: &s_out,
                    teacher: t_out.as_ref(),
                    progress,
                    token_weights: None,
                };
                let token_weights = router.prepare(&ctx)?.map(|w| w.detach());
                ctx.token_weights = token_weights.as_ref();
                let values: Vec<Tensor> = terms.iter().map(|t| t.term.compute(&ctx)).collect::<Result<_>>()?;
                let scalars: Vec<f64> = values.iter().map(scalar).collect::<Result<_>>()?;
                if let Some(i) = scalars.iter().position(|v| !v.is_finite()) {
                    bad = Some((format!("loss term `{}`", names[i]), scalars[i]));
                    continue;
                }
                // Routers weigh once per optimizer step, on the first micro-batch's signals.
                if weights.is_none() {
                    let w = router.weights(&TermSignals {
                        names: &names,
                        values: &scalars,
                        base_weights: &base_weights,
                        reads_features: &reads_features,
                        progress,
                    })?;
                    if w.len() != terms.len() {
                        return Err(Error::Runtime(format!(
                            "router returned {} weights for {} terms",
                            w.len(),
                            terms.len()
                        )));
                    }
                    weights = Some(w);
                }
                let w = weights.as_deref().unwrap_or(&base_weights);
                let mut total: Option<Tensor> = None;
                for (v, wi) in values.iter().zip(w) {
                    if *wi == 0.0 {
                        continue;
                    }
                    // Divided by the number of micro-batches: the summed gradients are those of
                    // the mean over the whole effective batch.
                    let wv = (v * (*wi / accum as f64))?;
                    total = Some(match total {
                        Some(t) => (t + wv)?,
                        None => wv,
                    });
                }
                let total = total.ok_or_else(|| {
                    Error::Runtime(format!(
                        "phase `{label}` stage `{}`: every term has weight 0",
                        stage.name
                    ))
                })?;
                let grads = opt.collect_grads(&total.backward()?)?;
                acc = Some(match acc {
                    None => grads,
                    Some(a) => a
                        .iter()
                        .zip(&grads)
                        .map(|(x, y)| x + y)
                        .collect::<candle_core::Result<_>>()?,
                });
                for (m, v) in mean_values.iter_mut().zip(&scalars) {
                    *m += v / accum as f64;
                }
            }
            let step_lr = stage.lr.at(progress) * stage.lr_schedule.value(progress);
            let mut norms = None;
            if bad.is_none() {
                let grads = acc
                    .as_ref()
                    .ok_or_else(|| Error::Runtime("no gradients accumulated".into()))?;
                let n = opt.norms(grads)?;
                if !n.total.is_finite() {
                    bad = Some(("the gradient norm".into(), n.total));
                }
                norms = Some(n);
            }
            if let Some(s) = stage_stats.last_mut() {
                s.steps = done - stage_start;
            }
            if let Some((what, value)) = bad {
                skipped += 1;
                consecutive_skips += 1;
                tracing::warn!("phase `{label}` step {done}: {what} is {value}; step skipped (no update)");
                record(
                    observers,
                    &json!({"event": "skip", "phase": label, "stage": stage.name, "step": done, "cause": what,
                            "value": value.to_string(), "skipped_total": skipped}),
                )?;
                if consecutive_skips > train.max_consecutive_skips {
                    return Err(Error::Runtime(format!(
                        "phase `{label}`: {consecutive_skips} consecutive steps skipped for non-finite values (last: \
                         {what} is {value} at step {done}); stopping (train.max_consecutive_skips = {}). The last \
                         checkpoint written is intact; lower train.lr or check the data",
                        train.max_consecutive_skips
                    )));
                }
                bar.set_position(done as u64);
                continue;
            }
            consecutive_skips = 0;
            let norms = norms.ok_or_else(|| Error::Runtime("gradient norms missing".into()))?;
            let grads = acc.ok_or_else(|| Error::Runtime("no gradients accumulated".into()))?;
            opt.step(grads, step_lr, norms.total)?;
            if let (Some(e), Some(d)) = (ema.as_mut(), train.ema_decay) {
                for ((_, var), avg) in model_vars.iter().zip(e.iter_mut()) {
                    *avg = ((&*avg * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
                }
            }
            let weights = weights.unwrap_or(base_weights);
            let total_value: f64 = mean_values.iter().zip(&weights).map(|(v, w)| v * w).sum();
            losses.push(total_value);

            let elapsed = start.elapsed().as_secs_f64();
            let tok_s = (tokens_at(done) - tokens_at(first_step)) as f64 / elapsed.max(1e-9);
            bar.set_position(done as u64);
            bar.set_message(format!("loss {total_value:.4} | {tok_s:.0} tok/s"));
            if train.log_every > 0 && (done.is_multiple_of(train.log_every) || done == total_steps || done == stage_end)
            {
                let term_values: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(&mean_values)
                    .map(|(n, v)| (n.clone(), json!(v)))
                    .collect();
                let term_weights: serde_json::Map<String, serde_json::Value> =
                    names.iter().zip(&weights).map(|(n, w)| (n.clone(), json!(w))).collect();
                let term_scalars: serde_json::Map<String, serde_json::Value> = terms
                    .iter()
                    .flat_map(|t| {
                        t.term
                            .scalars(progress)
                            .into_iter()
                            .map(move |(k, v)| (format!("{}.{k}", t.name), json!(v)))
                    })
                    .collect();
                let router_scalars: serde_json::Map<String, serde_json::Value> =
                    router.scalars().into_iter().map(|(k, v)| (k, json!(v))).collect();
                let group_norms: serde_json::Map<String, serde_json::Value> = groups
                    .iter()
                    .zip(&norms.per_group)
                    .map(|(g, n)| (g.pattern.clone(), json!(n)))
                    .collect();
                record(
                    observers,
                    &json!({
                        "event": "train", "phase": label, "stage": stage.name, "step": done, "loss": total_value,
                        "terms": term_values, "weights": term_weights, "scalars": term_scalars,
                        "router": router_scalars, "lr": step_lr, "grad_norm": norms.total,
                        "grad_norm_groups": group_norms, "tokens": tokens_at(done), "tokens_per_s": tok_s,
                        "elapsed_s": elapsed, "skipped_total": skipped,
                    }),
                )?;
            }
            let eval_due = train.eval_every > 0 && done.is_multiple_of(train.eval_every) && done != total_steps;
            // This step's evaluation, shared by the periodic record and the stage end.
            let mut evaluated: Option<EvalResult> = None;
            if eval_due {
                let r = eval_as_exported(student, &model_vars, ema.as_deref(), val, val_teacher)?;
                evaluated = Some(r);
                record(observers, &eval_record(label, &stage.name, done, &r))?;
                if let Some(e) = early.as_mut() {
                    let value = metric_of(&r, e.spec.metric)?;
                    if e.improves(value) {
                        e.state.best = Some(value);
                        e.state.best_step = done;
                        e.state.bad_evals = 0;
                        let w: Vec<Tensor> = match &ema {
                            Some(avg) => avg.clone(),
                            None => model_vars
                                .iter()
                                .map(|(_, v)| v.as_tensor().detach().copy())
                                .collect::<candle_core::Result<_>>()?,
                        };
                        if let Some(policy) = &checkpoints {
                            let map: HashMap<String, Tensor> = model_vars
                                .iter()
                                .map(|(n, _)| n.clone())
                                .zip(w.iter().cloned())
                                .collect();
                            checkpoint::write_best(
                                &policy.root,
                                PhaseState {
                                    phase: label.to_string(),
                                    step: done,
                                    early: Some(e.state.clone()),
                                    ..PhaseState::default()
                                },
                                &map,
                            )?;
                        }
                        e.weights = Some(w);
                    } else {
                        e.state.bad_evals += 1;
                        if e.state.bad_evals >= e.spec.patience {
                            stopped_early_at = Some(done);
                        }
                    }
                }
            }
            if let Some(at) = stopped_early_at {
                let e = early.as_ref().map(|e| e.state.clone());
                tracing::info!("{label}: early stopping at step {at} ({e:?})");
                record(
                    observers,
                    &json!({"event": "early_stop", "phase": label, "stage": stage.name, "step": at,
                                          "record": e}),
                )?;
                break 'stages;
            }
            let checkpoint_due = match &checkpoints {
                Some(p) => {
                    (p.every > 0 && done.is_multiple_of(p.every) && done != total_steps)
                        || (done == stage_end && si + 1 < stages.len())
                }
                None => false,
            };
            if done == stage_end && multi_stage {
                let r = match evaluated {
                    Some(r) => r,
                    None => eval_as_exported(student, &model_vars, ema.as_deref(), val, val_teacher)?,
                };
                let tail = &losses[losses.len().saturating_sub(10.min(stage.steps))..];
                if let Some(s) = stage_stats.last_mut() {
                    s.final_loss = (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64);
                    s.val_loss = Some(r.val_loss);
                }
                let mut rec = eval_record(label, &stage.name, done, &r);
                rec["event"] = json!("stage_end");
                rec["final_loss"] = json!(stage_stats.last().and_then(|s| s.final_loss));
                record(observers, &rec)?;
            }
            if let (true, Some(policy)) = (checkpoint_due, &checkpoints) {
                let mut model: HashMap<String, Tensor> = all_vars
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                    .collect();
                if let Some(e) = &ema {
                    for ((name, _), t) in model_vars.iter().zip(e) {
                        model.insert(format!("ema.{name}"), t.clone());
                    }
                }
                let (optimizer, adam_t) = opt.export_state();
                let metrics_len = match &policy.metrics {
                    Some(m) => std::fs::metadata(m).map(|md| md.len()).unwrap_or(0),
                    None => 0,
                };
                let state = PhaseState {
                    phase: label.to_string(),
                    step: done,
                    adam_t,
                    batch_stream_pos: batcher.stream_pos().to_string(),
                    router: router.state(),
                    skipped,
                    consecutive_skips,
                    losses: losses.clone(),
                    metrics_len,
                    files: Default::default(),
                    early: early.as_ref().map(|e| e.state.clone()),
                    stages: stage_stats.clone(),
                };
                checkpoint::write(&policy.root, state, &model, &optimizer, policy.keep)?;
            }
        }
        if !multi_stage {
            if let Some(s) = stage_stats.last_mut() {
                let tail = &losses[losses.len().saturating_sub(10)..];
                s.final_loss = (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64);
            }
        }
    }
    bar.finish_and_clear();
    if let Some(e) = ema.take() {
        // The phase ends with the averaged weights: they are what is evaluated and exported.
        for ((_, var), t) in model_vars.iter().zip(&e) {
            var.set(t)?;
        }
    }
    let steps_run = stopped_early_at.unwrap_or(total_steps);
    let mut best = None;
    if let Some(e) = early.as_mut() {
        // The final weights are a candidate too (unless the last evaluation just saw them).
        let evaluated_last = train.eval_every > 0 && steps_run % train.eval_every == 0 && steps_run != total_steps;
        if !evaluated_last {
            let r = eval_model(student, val, val_teacher)?;
            let value = metric_of(&r, e.spec.metric)?;
            if e.improves(value) {
                e.state.best = Some(value);
                e.state.best_step = steps_run;
                e.weights = None; // the current weights are the best
            }
        }
        if e.state.best_step != steps_run {
            let w = match e.weights.take() {
                Some(w) => w,
                None => {
                    let root = checkpoints
                        .as_ref()
                        .map(|p| p.root.clone())
                        .ok_or_else(|| Error::Runtime(format!("phase `{label}`: the best weights were not kept")))?;
                    let ck = checkpoint::load_best(&root, &device)?
                        .ok_or_else(|| Error::Runtime(format!("{}: no best checkpoint", root.display())))?;
                    ck.tensors_of(&model_vars)?
                }
            };
            for ((_, var), t) in model_vars.iter().zip(&w) {
                var.set(t)?;
            }
        }
        if let Some(value) = e.state.best {
            best = Some(BestEval {
                metric: e.state.metric.clone(),
                value,
                step: e.state.best_step,
            });
            record(
                observers,
                &json!({"event": "best", "phase": label, "metric": e.state.metric, "value": value,
                        "step": e.state.best_step}),
            )?;
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let tokens = tokens_at(steps_run);
    Ok(PhaseStats {
        steps: steps_run,
        skipped,
        tokens,
        wall_s,
        tokens_per_s: (tokens - tokens_at(first_step.min(steps_run))) as f64 / wall_s.max(1e-9),
        losses,
        stages: stage_stats,
        best,
        stopped_early_at,
    })
}

fn eval_model(student: &dyn Student, val: &[Batch], val_teacher: Option<&[Tensor]>) -> Result<EvalResult> {
    evaluate(
        &|_, b| Ok(student.forward(b, &TapSet::none())?.logits),
        val,
        val_teacher,
    )
}

/// Evaluates the weights the phase would export now: the EMA when there is one (swapped in and
/// back out), else the current ones.
fn eval_as_exported(
    student: &dyn Student,
    model_vars: &[(String, Var)],
    ema: Option<&[Tensor]>,
    val: &[Batch],
    val_teacher: Option<&[Tensor]>,
) -> Result<EvalResult> {
    match ema {
        Some(e) => with_weights(model_vars, e, || eval_model(student, val, val_teacher)),
        None => eval_model(student, val, val_teacher),
    }
}

fn eval_record(label: &str, stage: &str, step: usize, r: &EvalResult) -> serde_json::Value {
    json!({"event": "eval", "phase": label, "stage": stage, "step": step, "val_loss": r.val_loss,
           "perplexity": r.perplexity, "kl_to_teacher": r.kl_to_teacher, "top1_agreement": r.top1_agreement})
}

fn student_device(student: &dyn Student) -> Result<candle_core::Device> {
    student
        .vars()
        .first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| Error::Runtime("the student has no trainable parameters".into()))
}
