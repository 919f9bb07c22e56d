//! The memory a run needs on its device, estimated at assembly from the models' shapes and the
//! batch, printed by `check` and refused when it cannot fit.
//!
//! Per phase, the peak is what stays resident plus what one micro-batch of `b` windows of `s`
//! tokens (`T = b s`) keeps for the backward pass:
//!
//! - trained model of `P` parameters of `d` bytes: weights, gradients and AdamW's two moments,
//!   `4 P d` (plus `P d` for an EMA);
//! - activations of each of its `L` blocks of width `h` and `a` heads: `T h (34 + 5 a s / h) d/2`
//!   bytes (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
//!   Models", with `d/2` scaling their 16-bit count to the model's dtype);
//! - logits: `3 T V` floats of 4 bytes (logits, their softmax, their gradient), or `3 c V` for a
//!   head fused in chunks of `c` tokens;
//! - a frozen teacher: its weights, one block's activations and `2 T V` floats of logits.
//!
//! Teacher pretraining is a phase of its own (the teacher trained as above). An estimate, not a
//! measurement: allocator slack and the framework's own buffers come on top.

use std::fmt;

use candle_core::Device;

use retort_core::memory::{device_memory, human_bytes, DeviceMemory};
use retort_core::{Error, ModelInfo, Result};

/// A model's shape and size, as the estimate needs them.
#[derive(Debug, Clone, Copy)]
pub struct ModelSize {
    /// Its shape.
    pub info: ModelInfo,
    /// Its parameters.
    pub params: usize,
}

/// The batch and the options that size the activations.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Windows per micro-batch.
    pub batch: usize,
    /// Tokens per window.
    pub seq_len: usize,
    /// Tokens per chunk when the student's head is fused with the loss.
    pub head_chunk: Option<usize>,
    /// Whether an EMA of the weights is kept.
    pub ema: bool,
}

/// One phase's estimate, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseMemory {
    /// Weights, gradients, optimizer state (and EMA) of the trained model.
    pub training_state: u64,
    /// What one micro-batch keeps for the backward pass, logits included.
    pub activations: u64,
    /// A frozen teacher: weights and its forward pass.
    pub teacher: u64,
}

impl PhaseMemory {
    /// The phase's peak.
    pub fn total(&self) -> u64 {
        self.training_state
            .saturating_add(self.activations)
            .saturating_add(self.teacher)
    }
}

/// The run's estimate: the distillation phase and, when the pipeline pretrains its teacher,
/// that phase.
#[derive(Debug, Clone)]
pub struct MemoryEstimate {
    /// Distillation of the student (the baseline needs no more).
    pub distillation: PhaseMemory,
    /// Teacher pretraining, if the run does it.
    pub pretraining: Option<PhaseMemory>,
    /// The device's memory, when it can be asked.
    pub device: Option<DeviceMemory>,
}

impl MemoryEstimate {
    /// The estimate for `student` taught by `teacher` (pretrained first when `pretrain`) on
    /// `work`, against the memory of `device`.
    pub fn new(
        student: ModelSize,
        teacher: Option<ModelSize>,
        pretrain: bool,
        work: Workload,
        device: &Device,
    ) -> Self {
        let frozen = teacher.map(|t| frozen_teacher(t, work)).unwrap_or(0);
        let distillation = PhaseMemory {
            training_state: training_state(student, work.ema),
            activations: activations(student, work, work.head_chunk),
            teacher: frozen,
        };
        let pretraining = teacher.filter(|_| pretrain).map(|t| PhaseMemory {
            training_state: training_state(t, false),
            activations: activations(t, work, None),
            teacher: 0,
        });
        MemoryEstimate {
            distillation,
            pretraining,
            device: device_memory(device),
        }
    }

    /// The run's peak: its largest phase.
    pub fn peak(&self) -> u64 {
        let pre = self.pretraining.map(|p| p.total()).unwrap_or(0);
        self.distillation.total().max(pre)
    }

    /// The config key of the largest part of the peak: the batch for activations, else the model.
    fn dominant_key(&self) -> &'static str {
        let d = &self.distillation;
        let (pre, key) = match self.pretraining {
            Some(p) if p.total() > d.total() => (
                true,
                if p.activations > p.training_state {
                    "train.batch_size"
                } else {
                    "teacher"
                },
            ),
            _ => (false, ""),
        };
        if pre {
            return key;
        }
        let parts = [
            (d.activations, "train.batch_size"),
            (d.training_state, "student"),
            (d.teacher, "teacher"),
        ];
        parts
            .iter()
            .max_by_key(|(b, _)| *b)
            .map(|(_, k)| *k)
            .unwrap_or("train.batch_size")
    }

    /// Refuses a run whose peak exceeds everything the device could hold; warns when it exceeds
    /// what is free now.
    pub fn check(&self) -> Result<()> {
        let Some(m) = self.device else {
            return Ok(());
        };
        let peak = self.peak();
        if peak > m.total {
            return Err(Error::config(
                self.dominant_key(),
                format!(
                    "the run needs about {} of memory ({self}), more than the device has in all ({}); \
                     shrink the models (student.*, teacher.*), train.batch_size or train.seq_len, or \
                     raise train.grad_accum",
                    human_bytes(peak),
                    human_bytes(m.total)
                ),
            ));
        }
        if peak > m.available {
            tracing::warn!(
                "the run needs about {} of memory, more than is free now ({}): it may swap or fail",
                human_bytes(peak),
                human_bytes(m.available)
            );
        }
        Ok(())
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.distillation;
        write!(
            f,
            "~{} at peak: student weights, gradients and AdamW {}, activations {}",
            human_bytes(self.peak()),
            human_bytes(d.training_state),
            human_bytes(d.activations)
        )?;
        if d.teacher > 0 {
            write!(f, ", frozen teacher {}", human_bytes(d.teacher))?;
        }
        if let Some(p) = self.pretraining {
            write!(f, "; teacher pretraining {}", human_bytes(p.total()))?;
        }
        match self.device {
            Some(m) => write!(
                f,
                " (device: {} free of {})",
                human_bytes(m.available),
                human_bytes(m.total)
            ),
            None => write!(f, " (device memory unknown)"),
        }
    }
}

/// Sizes are computed in `f64`: exact below 2^53, and saturating (never overflowing) for
/// the absurd sizes this estimate exists to refuse.
fn bytes(n: f64) -> u64 {
    n as u64
}

fn training_state(m: ModelSize, ema: bool) -> u64 {
    let copies = if ema { 5.0 } else { 4.0 };
    bytes(copies * m.params as f64 * m.info.dtype.size_in_bytes() as f64)
}

/// Bytes one block keeps for the backward pass of a micro-batch.
fn block_activations(m: ModelSize, work: Workload) -> f64 {
    let (b, s) = (work.batch as f64, work.seq_len as f64);
    let (h, a) = (m.info.hidden as f64, m.info.heads as f64);
    let half_d = m.info.dtype.size_in_bytes() as f64 / 2.0;
    // 34 T h + 5 a s T values of d/2 bytes (Korthikanti et al.).
    (34.0 * b * s * h + 5.0 * a * s * s * b) * half_d
}

fn activations(m: ModelSize, work: Workload, head_chunk: Option<usize>) -> u64 {
    let tokens = work.batch as f64 * work.seq_len as f64;
    let logit_rows = head_chunk.map(|c| (c as f64).min(tokens)).unwrap_or(tokens);
    let logits = 3.0 * logit_rows * m.info.vocab as f64 * 4.0;
    bytes(m.info.layers as f64 * block_activations(m, work) + logits)
}

fn frozen_teacher(t: ModelSize, work: Workload) -> u64 {
    let tokens = work.batch as f64 * work.seq_len as f64;
    let weights = t.params as f64 * t.info.dtype.size_in_bytes() as f64;
    bytes(weights + block_activations(t, work) + 2.0 * tokens * t.info.vocab as f64 * 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn model(layers: usize, hidden: usize, vocab: usize, params: usize) -> ModelSize {
        ModelSize {
            info: ModelInfo {
                layers,
                hidden,
                heads: 4,
                vocab,
                context: 1024,
                dtype: DType::F32,
            },
            params,
        }
    }

    fn work(batch: usize, head_chunk: Option<usize>) -> Workload {
        Workload {
            batch,
            seq_len: 256,
            head_chunk,
            ema: false,
        }
    }

    #[test]
    fn the_terms_follow_the_formulas() {
        let s = model(2, 64, 100, 1000);
        let e = MemoryEstimate::new(s, None, false, work(8, None), &Device::Cpu);
        assert_eq!(e.distillation.training_state, 4 * 1000 * 4);
        let tokens = 8 * 256;
        let block = (34 * tokens * 64 + 5 * 4 * 256 * tokens) * 4 / 2;
        assert_eq!(e.distillation.activations, (2 * block + 3 * tokens * 100 * 4) as u64);
        assert_eq!(e.distillation.teacher, 0);
        assert_eq!(e.peak(), e.distillation.total());
    }

    #[test]
    fn a_fused_head_and_a_pretrained_teacher_change_the_peak() {
        let (s, t) = (model(2, 64, 50_000, 10_000_000), model(8, 256, 50_000, 40_000_000));
        let full = MemoryEstimate::new(s, Some(t), true, work(8, None), &Device::Cpu);
        let fused = MemoryEstimate::new(s, Some(t), true, work(8, Some(256)), &Device::Cpu);
        assert!(fused.distillation.activations < full.distillation.activations / 4);
        let pre = full.pretraining.expect("pretraining").total();
        assert_eq!(full.peak(), pre.max(full.distillation.total()));
        assert!(full.to_string().contains("teacher pretraining"), "{full}");
    }

    #[test]
    fn what_cannot_fit_is_refused_naming_the_batch() {
        let huge = model(1000, 100_000, 50_000, usize::MAX / 64);
        let e = MemoryEstimate::new(huge, None, false, work(64, None), &Device::Cpu);
        let err = e.check().expect_err("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("more than the device has in all"), "{err}");
        assert!(err.to_string().contains("`student`"), "the weights dominate: {err}");
        let small = MemoryEstimate::new(model(1, 8, 16, 100), None, false, work(2, None), &Device::Cpu);
        small.check().expect("fits");
    }
}
