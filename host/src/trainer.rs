//! The training loop shared by teacher pretraining, distillation and the scratch baseline.
//!
//! One step: batch -> teacher forward (no grad, only if a term needs it) -> student forward
//! (with the taps the terms asked for) -> each term -> router weights ->
//! `total = sum_i w_i * term_i` -> backward -> AdamW (clipped) -> metrics.

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
use crate::eval::evaluate;
use crate::optim::{AdamW, AdamWConfig};

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
    /// Where periodic checkpoints go (overwritten atomically), if anywhere.
    pub checkpoint_dir: Option<PathBuf>,
    /// Show a progress bar.
    pub progress_bar: bool,
}

/// What a phase did.
#[derive(Debug, Clone)]
pub struct PhaseStats {
    /// Optimizer steps taken.
    pub steps: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// Wall time in seconds.
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
        checkpoint_dir,
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
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            beta1: train.beta1,
            beta2: train.beta2,
            eps: train.eps,
            weight_decay: train.weight_decay,
            grad_clip: train.grad_clip,
        },
    )?;
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

    let tokens_per_step = train.batch_size * train.seq_len;
    let start = Instant::now();
    let mut losses = Vec::with_capacity(steps);
    for step in 0..steps {
        let progress = Progress::new(step, steps);
        let batch = batcher.next_batch()?;
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
            return Err(Error::Runtime(format!(
                "phase `{label}` step {step}: loss term `{}` is {} (lower train.lr or check the data)",
                names[i], scalars[i]
            )));
        }
        let base_weights: Vec<f64> = terms.iter().map(|t| t.weight.at(progress)).collect();
        let weights = router.weights(&TermSignals {
            names: &names,
            values: &scalars,
            base_weights: &base_weights,
            reads_features: &reads_features,
            progress,
        })?;
        if weights.len() != terms.len() {
            return Err(Error::Runtime(format!(
                "router returned {} weights for {} terms",
                weights.len(),
                terms.len()
            )));
        }
        let mut total: Option<Tensor> = None;
        for (v, w) in values.iter().zip(&weights) {
            if *w == 0.0 {
                continue;
            }
            let wv = (v * *w)?;
            total = Some(match total {
                Some(t) => (t + wv)?,
                None => wv,
            });
        }
        let total = total.ok_or_else(|| Error::Runtime(format!("phase `{label}`: every term has weight 0")))?;
        let total_value: f64 = scalars.iter().zip(&weights).map(|(v, w)| v * w).sum();
        let grads = total.backward()?;
        let step_lr = lr.at(progress) * lr_schedule.value(progress);
        let stats = opt.step(&grads, step_lr)?;
        losses.push(total_value);

        let done = step + 1;
        let elapsed = start.elapsed().as_secs_f64();
        let tok_s = (done * tokens_per_step) as f64 / elapsed.max(1e-9);
        bar.set_position(done as u64);
        bar.set_message(format!("loss {total_value:.4} | {tok_s:.0} tok/s"));
        if train.log_every > 0 && (done % train.log_every == 0 || done == steps) {
            let term_values: serde_json::Map<String, serde_json::Value> =
                names.iter().zip(&scalars).map(|(n, v)| (n.clone(), json!(v))).collect();
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
            let rec = json!({
                "event": "train", "phase": label, "step": done, "loss": total_value,
                "terms": term_values, "weights": term_weights, "scalars": term_scalars, "router": router_scalars, "lr": step_lr,
                "grad_norm": stats.grad_norm, "tokens": done * tokens_per_step,
                "tokens_per_s": tok_s, "elapsed_s": elapsed,
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
        if let Some(dir) = &checkpoint_dir {
            if train.checkpoint_every > 0 && done % train.checkpoint_every == 0 {
                student.save(dir)?;
            }
        }
    }
    bar.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64();
    let tokens = steps * tokens_per_step;
    Ok(PhaseStats {
        steps,
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
