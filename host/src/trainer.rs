//! The training loop shared by teacher pretraining, distillation and the scratch baseline.
//!
//! One step: batch -> teacher forward (no grad, only if a term needs it) -> student forward
//! (with the taps the terms asked for) -> each term -> router weights ->
//! `total = sum_i w_i * term_i` -> backward -> AdamW (clipped) -> metrics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use retort_core::config::TrainSection;
use retort_core::{
    Batch, DataSource, Error, LossTerm, Observer, Progress, Result, Router, Scalar, Schedule, Split, StepContext,
    Student, TapSet, Teacher, TermSignals,
};

use crate::batching::TrainBatcher;
use crate::checkpoint::{self, LoadedCheckpoint, PhaseState};
use crate::eval::evaluate;
use crate::optim::{assign_groups, AdamW, AdamWConfig};

/// A loss term with its metrics name and configured weight.
pub struct TermSlot {
    /// Name in metrics.
    pub name: String,
    /// Configured weight (a number or a schedule).
    pub weight: Scalar,
    /// The term.
    pub term: Box<dyn LossTerm>,
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
    /// Factor on the learning rate.
    pub lr_schedule: Box<dyn Schedule>,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (a number or a schedule), times `lr_schedule`.
    pub lr: Scalar,
    /// Batch size, window, optimizer and logging settings.
    pub train: &'a TrainSection,
    /// Seed of the batch sequence.
    pub batch_seed: u64,
    /// Validation batches for periodic evaluation.
    pub val: &'a [Batch],
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

/// What a phase did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PhaseStats {
    /// Steps of the phase (skipped ones included).
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
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Runs `phase` over the training split of `data`, sending records to `observers`.
pub fn train_phase(phase: Phase, data: &dyn DataSource, observers: &mut [Box<dyn Observer>]) -> Result<PhaseStats> {
    let Phase {
        label,
        student,
        teacher,
        terms,
        mut router,
        lr_schedule,
        steps,
        lr,
        train,
        batch_seed,
        val,
        checkpoints,
        resume,
        progress_bar,
    } = phase;
    let device = student_device(student)?;
    let mut batcher = TrainBatcher::new(
        data.tokens(Split::Train),
        train.batch_size,
        train.seq_len,
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
    let all_vars = vars.clone();
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
    let (grouped, groups) = assign_groups(vars, &train.param_groups, train.weight_decay)?;
    let mut opt = AdamW::new(
        grouped,
        groups.len(),
        AdamWConfig {
            beta1: train.beta1,
            beta2: train.beta2,
            eps: train.eps,
            weight_decay: train.weight_decay,
            grad_clip: train.grad_clip,
        },
    )?;
    for g in &groups {
        tracing::info!(
            "{label} param group {:<28} tensors {:>3} parameters {:>9} lr x{} weight decay {}",
            g.pattern,
            g.tensors,
            g.parameters,
            g.lr_mult,
            g.weight_decay
        );
    }
    if resume.is_none() {
        // (A resumed phase logged its groups before the checkpoint it continues from.)
        let rec = json!({"event": "param_groups", "phase": label, "groups": &groups});
        for o in observers.iter_mut() {
            o.record(&rec)?;
        }
    }
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

    let bar = if progress_bar {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .map_err(|e| Error::Runtime(e.to_string()))?
            .progress_chars("=> "),
    );
    bar.set_prefix(label);

    let accum = train.grad_accum.max(1);
    let tokens_per_step = train.batch_size * train.seq_len * accum;
    let start = Instant::now();
    let mut losses = Vec::with_capacity(steps);
    let (mut skipped, mut consecutive_skips) = (0usize, 0usize);
    let mut first_step = 0;
    if let Some(ck) = resume {
        for (name, var) in &all_vars {
            let t = ck.model.get(name).ok_or_else(|| {
                Error::input(
                    format!("checkpoint {}", ck.dir.display()),
                    format!("tensor `{name}` is missing"),
                )
            })?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        opt.import_state(&ck.optimizer, ck.state.adam_t)?;
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
        (skipped, consecutive_skips, first_step) = (ck.state.skipped, ck.state.consecutive_skips, ck.state.step);
        tracing::info!("{label}: resumed at step {first_step} from {}", ck.dir.display());
        bar.set_position(first_step as u64);
    }
    for step in first_step..steps {
        let progress = Progress::new(step, steps);
        let done = step + 1;
        let base_weights: Vec<f64> = terms.iter().map(|t| t.weight.at(progress)).collect();
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
            let total = total.ok_or_else(|| Error::Runtime(format!("phase `{label}`: every term has weight 0")))?;
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
        let step_lr = lr.at(progress) * lr_schedule.value(progress);
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
        if let Some((what, value)) = bad {
            skipped += 1;
            consecutive_skips += 1;
            tracing::warn!("phase `{label}` step {done}: {what} is {value}; step skipped (no update)");
            let rec = json!({"event": "skip", "phase": label, "step": done, "cause": what, "value": value.to_string(),
                             "skipped_total": skipped});
            for o in observers.iter_mut() {
                o.record(&rec)?;
            }
            if consecutive_skips > train.max_consecutive_skips {
                return Err(Error::Runtime(format!(
                    "phase `{label}`: {consecutive_skips} consecutive steps skipped for non-finite values (last: {what} \
                     is {value} at step {done}); stopping (train.max_consecutive_skips = {}). The last checkpoint \
                     written is intact; lower train.lr or check the data",
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
        let tok_s = ((done - first_step) * tokens_per_step) as f64 / elapsed.max(1e-9);
        bar.set_position(done as u64);
        bar.set_message(format!("loss {total_value:.4} | {tok_s:.0} tok/s"));
        if train.log_every > 0 && (done % train.log_every == 0 || done == steps) {
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
            let rec = json!({
                "event": "train", "phase": label, "step": done, "loss": total_value,
                "terms": term_values, "weights": term_weights, "scalars": term_scalars, "router": router_scalars,
                "lr": step_lr, "grad_norm": norms.total, "grad_norm_groups": group_norms,
                "tokens": done * tokens_per_step, "tokens_per_s": tok_s, "elapsed_s": elapsed, "skipped_total": skipped,
            });
            for o in observers.iter_mut() {
                o.record(&rec)?;
            }
        }
        if train.eval_every > 0 && done % train.eval_every == 0 && done != steps {
            let r = evaluate(&|_, b| Ok(student.forward(b, &TapSet::none())?.logits), val, None)?;
            let rec = json!({"event": "eval", "phase": label, "step": done, "val_loss": r.val_loss, "perplexity": r.perplexity});
            for o in observers.iter_mut() {
                o.record(&rec)?;
            }
        }
        if let Some(policy) = checkpoints
            .as_ref()
            .filter(|p| p.every > 0 && done % p.every == 0 && done != steps)
        {
            let model: HashMap<String, Tensor> = all_vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                .collect();
            let mut model = model;
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
            };
            checkpoint::write(&policy.root, state, &model, &optimizer, policy.keep)?;
        }
    }
    bar.finish_and_clear();
    if let Some(e) = &ema {
        // The phase ends with the averaged weights: they are what is evaluated and exported.
        for ((_, var), t) in model_vars.iter().zip(e) {
            var.set(t)?;
        }
    }
    let wall_s = start.elapsed().as_secs_f64();
    let tokens = steps * tokens_per_step;
    Ok(PhaseStats {
        steps,
        skipped,
        tokens,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        losses,
    })
}

fn student_device(student: &dyn Student) -> Result<candle_core::Device> {
    student
        .vars()
        .first()
        .map(|(_, v)| v.device().clone())
        .ok_or_else(|| Error::Runtime("the student has no trainable parameters".into()))
}
