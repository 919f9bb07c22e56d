//! The reference KD training step for throughput comparisons with PyTorch
//! (`../shared/bench/torch_kd_reference.py`): teacher 4 layers / 128 wide, student 2 layers /
//! 64 wide, 4 heads, vocabulary 65, block 128, batch 16, GELU (tanh).
//!
//! One step, timed as the PyTorch script times it: draw a batch, teacher forward (no graph),
//! student forward, `0.5 * ce + 0.5 * kl` with `kl` at `T = 2` times `T^2` (PyTorch's
//! `alpha * CE + (1 - alpha) * T^2 * KL(batchmean)`), backward, AdamW (lr 3e-4, weight decay
//! 0.01 on matrices), and read the loss value back. Used by the `kd_step` example (which
//! `scripts/bench_vs_torch.sh` runs) and by the criterion benches; not part of the library.

// Each of the two targets including this module uses part of it.
#![allow(dead_code)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use retort_core::{Batch, BuildContext, LossTerm, Model, Params, Progress, Result, StepContext, Student, TapSet};
use retort_plugins::models::transformer::{Activation, Transformer, TransformerConfig};

use retort_host::assemble::assign_groups;
use retort_host::engine::optim::{AdamW, AdamWConfig};

/// Shapes of the reference step.
#[derive(Debug, Clone, Copy)]
pub struct KdShapes {
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub block: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Teacher `(layers, width)`.
    pub teacher: (usize, usize),
    /// Student `(layers, width)`.
    pub student: (usize, usize),
    /// Attention heads (both models).
    pub heads: usize,
}

impl KdShapes {
    /// The shapes of `torch_kd_reference.py`.
    pub fn reference() -> Self {
        KdShapes {
            batch: 16,
            block: 128,
            vocab: 65,
            teacher: (4, 128),
            student: (2, 64),
            heads: 4,
        }
    }

    fn config(&self, (layers, width): (usize, usize)) -> TransformerConfig {
        TransformerConfig {
            vocab_size: self.vocab,
            context: self.block,
            n_layer: layers,
            n_embd: width,
            n_head: self.heads,
            activation: Activation::Gelu,
            layer_norm_eps: 1e-5,
            init_std: 0.02,
            dtype: DType::F32,
        }
    }
}

/// Teacher, student, loss terms and optimizer of the reference step.
pub struct KdStep {
    shapes: KdShapes,
    /// `None` in the teacher-training mode ([`KdStep::new_train`]).
    teacher: Option<Transformer>,
    student: Transformer,
    terms: Vec<(f64, Box<dyn LossTerm>)>,
    opt: AdamW,
    rng: ChaCha8Rng,
    device: Device,
}

/// Seconds of one step's teacher forward, student forward, loss, backward and AdamW.
pub type Phases = (f64, f64, f64, f64, f64);

impl KdStep {
    /// Builds the step with freshly initialised models (seeded).
    pub fn new(shapes: KdShapes, device: &Device) -> Result<Self> {
        Self::build(shapes, device, false)
    }

    /// The reference script's `train` mode instead: the teacher's architecture trained alone
    /// (forward with gradient, cross-entropy, backward, AdamW); no distillation. The trained
    /// model is reported as the "student" by the accessors and in [`KdStep::phases`].
    pub fn new_train(shapes: KdShapes, device: &Device) -> Result<Self> {
        Self::build(shapes, device, true)
    }

    fn build(shapes: KdShapes, device: &Device, train: bool) -> Result<Self> {
        let registry = retort_host::builtin_registry()?;
        let ctx = BuildContext::new(&registry, device.clone(), 0);
        let term = |kind: &str, p: serde_json::Value| -> Result<Box<dyn LossTerm>> {
            let params = Params::new("loss", p.as_object().cloned().unwrap_or_default());
            registry.losses.build(kind, &params, &ctx)
        };
        let (terms, teacher, student) = if train {
            let model = Transformer::init(shapes.config(shapes.teacher), 1, device)?;
            (vec![(1.0, term("ce", serde_json::json!({}))?)], None, model)
        } else {
            let terms = vec![
                (0.5, term("ce", serde_json::json!({}))?),
                (0.5, term("kl", serde_json::json!({"temperature": 2.0}))?),
            ];
            let teacher = Transformer::init(shapes.config(shapes.teacher), 1, device)?.frozen();
            let student = Transformer::init(shapes.config(shapes.student), 2, device)?;
            (terms, Some(teacher), student)
        };
        let (params, groups) = assign_groups(student.vars(), &[], 0.01, "train.param_groups")?;
        let opt = AdamW::new(
            params,
            groups.len(),
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                grad_clip: 0.0,
            },
        )?;
        Ok(KdStep {
            shapes,
            teacher,
            student,
            terms,
            opt,
            rng: ChaCha8Rng::seed_from_u64(0),
            device: device.clone(),
        })
    }

    /// Trainable parameters of the student.
    pub fn student_params(&self) -> usize {
        self.student.num_params()
    }

    /// A random batch of `batch x block` windows.
    pub fn batch(&mut self) -> Result<Batch> {
        let (b, t, v) = (self.shapes.batch, self.shapes.block, self.shapes.vocab as u32);
        let ids: Vec<u32> = (0..b * (t + 1)).map(|_| self.rng.random_range(0..v)).collect();
        let all = Tensor::from_vec(ids, (b, t + 1), &self.device)?;
        Ok(Batch {
            input_ids: all.narrow(1, 0, t)?.contiguous()?,
            targets: all.narrow(1, 1, t)?.contiguous()?,
            mask: None,
            source: None,
        })
    }

    /// The teacher's forward pass alone on a fresh batch (the KD step's first phase, frozen
    /// weights, no graph); returns its seconds. `None` in the teacher-training mode.
    pub fn teacher_forward(&mut self) -> Result<Option<f64>> {
        let batch = self.batch()?;
        let Some(teacher) = &self.teacher else { return Ok(None) };
        let start = Instant::now();
        let out = teacher.forward(&batch, &TapSet::none())?;
        // Read one value back, as the step reads its loss.
        out.logits
            .flatten_all()?
            .get(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(Some(start.elapsed().as_secs_f64()))
    }

    /// One full step; returns the loss value.
    pub fn step(&mut self) -> Result<f64> {
        Ok(self.timed_step()?.0)
    }

    /// One step like [`KdStep::step`], returning the seconds spent in teacher forward, student
    /// forward, loss, backward and AdamW.
    pub fn phases(&mut self) -> Result<Phases> {
        Ok(self.timed_step()?.1)
    }

    /// One step: the loss value and the seconds of its five phases.
    /// One step on retort's rayon pool, as the trainer runs it ([`retort_host::engine::pool`]).
    fn timed_step(&mut self) -> Result<(f64, Phases)> {
        retort_host::engine::pool::on_pool(|| self.timed_step_here())
    }

    fn timed_step_here(&mut self) -> Result<(f64, Phases)> {
        let batch = self.batch()?;
        let none = TapSet::none();
        let t0 = Instant::now();
        let t_out = self.teacher.as_ref().map(|t| t.forward(&batch, &none)).transpose()?;
        let t1 = Instant::now();
        let s_out = self.student.forward(&batch, &none)?;
        let t2 = Instant::now();
        let ctx = StepContext {
            batch: &batch,
            student: &s_out,
            teacher: t_out.as_ref(),
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let mut total: Option<Tensor> = None;
        for (w, term) in &self.terms {
            let v = (term.compute(&ctx)? * *w)?;
            total = Some(match total {
                Some(t) => (t + v)?,
                None => v,
            });
        }
        let total = total.ok_or_else(|| retort_core::Error::Runtime("no loss terms".into()))?;
        let t3 = Instant::now();
        let store = total.backward()?;
        let t4 = Instant::now();
        let grads = self.opt.collect_grads(&store)?;
        self.opt.step(grads, 3e-4, 0.0)?;
        let loss = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t5 = Instant::now();
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        Ok((loss, (s(t0, t1), s(t1, t2), s(t2, t3), s(t3, t4), s(t4, t5))))
    }

    /// The AdamW update alone (the gradients of one step, reused), for the optimizer bench.
    pub fn adamw_only(&mut self) -> Result<impl FnMut() -> Result<()> + '_> {
        let batch = self.batch()?;
        let none = TapSet::none();
        let t_out = self.teacher.as_ref().map(|t| t.forward(&batch, &none)).transpose()?;
        let s_out = self.student.forward(&batch, &none)?;
        let ctx = StepContext {
            batch: &batch,
            student: &s_out,
            teacher: t_out.as_ref(),
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let loss = self.terms[0].1.compute(&ctx)?;
        let grads = self.opt.collect_grads(&loss.backward()?)?;
        let opt = &mut self.opt;
        Ok(move || opt.step(grads.clone(), 3e-4, 0.0))
    }
}

/// Median and all step times of a timed run.
#[derive(Debug, Clone)]
pub struct KdTiming {
    /// Seconds per step, in order (warm-up excluded).
    pub times: Vec<f64>,
    /// Median seconds per step.
    pub median: f64,
    /// Tokens per second at the median.
    pub tokens_per_s: f64,
    /// The last loss value.
    pub loss: f64,
}

/// Runs `warmup + steps` steps and times the last `steps`, as the PyTorch script does.
pub fn time_steps(step: &mut KdStep, warmup: usize, steps: usize) -> Result<KdTiming> {
    let mut times = Vec::with_capacity(steps);
    let mut loss = f64::NAN;
    for i in 0..warmup + steps {
        let start = Instant::now();
        loss = step.step()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let tokens = (step.shapes.batch * step.shapes.block) as f64;
    Ok(KdTiming {
        times,
        median,
        tokens_per_s: tokens / median,
        loss,
    })
}
