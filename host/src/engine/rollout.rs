//! On-policy steps ([`OnPolicyPlan`]): each micro-batch's windows become prompts, the sampler
//! continues them, and the step trains on the sampled windows with a mask that keeps only the
//! sampled tokens; what the samples came to is summed for the metrics.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use retort_core::{Batch, Decoder, Error, Outputs, Result, Student, TapSet, Teacher};
use retort_plugins::kernels::cross_entropy;
use retort_plugins::models::generate::{sample_batch, Sampling, WindowDecoder};

use crate::artifacts::events::OnPolicyRecord;
use crate::assemble::OnPolicyPlan;

/// The model the samples come from.
#[derive(Clone, Copy)]
pub enum SampleModel<'a> {
    /// The student being trained (on-policy distillation, GKD).
    Student(&'a dyn Student),
    /// The teacher (sequence-level KD).
    Teacher(&'a dyn Teacher),
}

impl SampleModel<'_> {
    /// Logits `[batch, seq, vocab]` of windows `ids`, without gradient.
    fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids.clone(),
            mask: None,
            source: None,
        };
        Ok(match self {
            SampleModel::Student(m) => m.forward(&batch, &TapSet::none())?.logits.detach(),
            SampleModel::Teacher(t) => t.forward(&batch, &TapSet::none())?.logits,
        })
    }

    fn decoder(&self) -> Option<Box<dyn Decoder + '_>> {
        match self {
            SampleModel::Student(m) => m.decoder(),
            SampleModel::Teacher(t) => t.decoder(),
        }
    }

    fn context(&self) -> usize {
        match self {
            SampleModel::Student(m) => m.context_len(),
            SampleModel::Teacher(t) => t.context_len(),
        }
    }

    /// The sampled continuations of `prompts` (one length), through the model's own decoder
    /// (a key/value cache) or, without one, re-running the window every token.
    pub fn continue_prompts(
        &self,
        prompts: &[Vec<u32>],
        eos: Option<u32>,
        sampling: &Sampling,
        device: &Device,
    ) -> Result<Vec<Vec<u32>>> {
        let forward = |ids: &Tensor| self.logits(ids);
        let mut window = WindowDecoder::new(&forward, self.context());
        let mut own = self.decoder();
        let decoder: &mut dyn Decoder = match own.as_mut() {
            Some(d) => d.as_mut(),
            None => &mut window,
        };
        sample_batch(decoder, prompts, eos, sampling, device)
    }
}

/// Mixed into a micro-batch's sampling seed to draw its prompts from the data's.
const PROMPT_DRAW: u64 = 0x5be0_cd19_137e_2179;

/// The sampler of a phase's on-policy steps.
pub struct Rollout<'a> {
    plan: &'a OnPolicyPlan,
    model: SampleModel<'a>,
}

impl<'a> Rollout<'a> {
    /// Samples by `plan` from `model`.
    pub fn new(plan: &'a OnPolicyPlan, model: SampleModel<'a>) -> Self {
        Rollout { plan, model }
    }

    /// Whether step `step` (from 0) of a stage whose fraction of steps on samples is
    /// `lambda` (`None`: `on_policy.lambda`) trains on samples.
    pub fn on_step(&self, lambda: Option<f64>, step: usize) -> bool {
        OnPolicyPlan::samples_at(lambda.unwrap_or(self.plan.lambda), step)
    }

    /// The sampled windows of micro-batch `micro` of step `step`: the first
    /// `prompt_tokens` of each row of `batch` (or as many prompts drawn from the data's, when
    /// it gives prompts), continued by the sampler; and what the samples came to.
    pub fn sample(&self, batch: &Batch, step: usize, micro: usize) -> Result<(Batch, RolloutTotals)> {
        let started = Instant::now();
        let device = batch.input_ids.device().clone();
        let sampling = self.plan.sampling_at(step, micro);
        let prompts: Vec<Vec<u32>> = match &self.plan.prompts {
            // A stream of its own: the sampler's rows draw from `sampling.seed`'s streams.
            Some(pool) => pool.draw(batch.input_ids.dim(0)?, sampling.seed ^ PROMPT_DRAW),
            None => batch
                .input_ids
                .narrow(1, 0, self.plan.prompt_tokens)?
                .to_dtype(DType::U32)?
                .to_vec2()?,
        };
        let completions = self
            .model
            .continue_prompts(&prompts, self.plan.eos, &sampling, &device)?;
        let sampled = sampled_batch(&prompts, &completions, self.plan.window(), self.plan.eos, &device)?;
        let totals = RolloutTotals {
            steps: 0,
            samples: completions.len(),
            new_tokens: completions.iter().map(Vec::len).sum(),
            eos: completions
                .iter()
                .filter(|c| self.plan.eos.is_some() && c.last().copied() == self.plan.eos)
                .count(),
            sample_seconds: started.elapsed().as_secs_f64(),
            ..RolloutTotals::default()
        };
        Ok((sampled, totals))
    }
}

/// The windows a step trains on from `prompts` and their `completions`: row `i` is
/// `prompt_i ++ completion_i`, padded to `window + 1` tokens with the end-of-sequence id (or 0);
/// inputs are its first `window` tokens, targets the last `window`; the mask is 1 exactly where
/// the target is a sampled token (prompt, padding and anything after the end of sequence: 0).
pub fn sampled_batch(
    prompts: &[Vec<u32>],
    completions: &[Vec<u32>],
    window: usize,
    eos: Option<u32>,
    device: &Device,
) -> Result<Batch> {
    let rows = prompts.len();
    let (mut ids, mut targets, mut mask) = (
        Vec::with_capacity(rows * window),
        Vec::with_capacity(rows * window),
        Vec::with_capacity(rows * window),
    );
    for (p, c) in prompts.iter().zip(completions) {
        let mut row: Vec<u32> = p.iter().chain(c).copied().collect();
        if row.len() > window + 1 || p.is_empty() {
            return Err(Error::Runtime(format!(
                "a sample of {} + {} tokens does not fit a window of {window}",
                p.len(),
                c.len()
            )));
        }
        row.resize(window + 1, eos.unwrap_or(0));
        ids.extend_from_slice(&row[..window]);
        targets.extend_from_slice(&row[1..]);
        let sampled = (p.len() - 1)..(p.len() - 1 + c.len());
        mask.extend((0..window).map(|t| if sampled.contains(&t) { 1f32 } else { 0.0 }));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (rows, window), device)?,
        targets: Tensor::from_vec(targets, (rows, window), device)?,
        mask: Some(Tensor::from_vec(mask, (rows, window), device)?),
        source: None,
    })
}

/// `(sum, count)` of the teacher's `-log p(target)` over the tokens of `batch`'s mask: the
/// teacher-scored NLL of sampled tokens. Reads dense logits, or the head's input and weight (a
/// teacher that hands its head), row by row.
pub fn teacher_nll(teacher: &Outputs, batch: &Batch) -> Result<(f64, usize)> {
    let Some(mask) = &batch.mask else {
        return Ok((0.0, 0));
    };
    let mask = mask.to_dtype(DType::F64)?;
    let count = mask.sum_all()?.to_scalar::<f64>()? as usize;
    let per_token = match teacher.lm_head() {
        Some((hidden, weight)) if teacher.logits.dim(2)? == 0 => {
            let rows = (0..hidden.dim(0)?)
                .map(|b| {
                    let logits = hidden.get(b)?.matmul(&weight.t()?)?;
                    cross_entropy::per_token(&logits.to_dtype(DType::F32)?, &batch.targets.get(b)?, 0.0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)?
        }
        _ => cross_entropy::per_token(&teacher.logits.to_dtype(DType::F32)?, &batch.targets, 0.0)?,
    };
    let sum = (per_token.to_dtype(DType::F64)? * mask)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok((sum, count))
}

/// What on-policy steps' samples came to, summed (over a step's micro-batches, then over the
/// steps between two train records; kept in checkpoints so that a resumed run reports the same).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutTotals {
    /// On-policy steps.
    pub steps: usize,
    /// Sequences sampled.
    pub samples: usize,
    /// Tokens sampled.
    pub new_tokens: usize,
    /// Samples that ended with the end-of-sequence token.
    pub eos: usize,
    /// Wall time spent sampling.
    pub sample_seconds: f64,
    /// Wall time of the on-policy steps (sampling included).
    pub step_seconds: f64,
    /// Sum of the teacher's `-log p` of the sampled tokens.
    pub teacher_nll: f64,
    /// Tokens the teacher scored.
    pub scored_tokens: usize,
}

impl RolloutTotals {
    /// The counts summed over the ranks of `world` (every rank sampled its rows); the wall
    /// times stay this rank's.
    pub fn sum_over(&mut self, world: &crate::engine::parallel::World) -> Result<()> {
        let mut v = [
            self.samples as f64,
            self.new_tokens as f64,
            self.eos as f64,
            self.teacher_nll,
            self.scored_tokens as f64,
        ];
        world.sum(&mut v)?;
        self.samples = v[0] as usize;
        self.new_tokens = v[1] as usize;
        self.eos = v[2] as usize;
        self.teacher_nll = v[3];
        self.scored_tokens = v[4] as usize;
        Ok(())
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &RolloutTotals) {
        self.steps += other.steps;
        self.samples += other.samples;
        self.new_tokens += other.new_tokens;
        self.eos += other.eos;
        self.sample_seconds += other.sample_seconds;
        self.step_seconds += other.step_seconds;
        self.teacher_nll += other.teacher_nll;
        self.scored_tokens += other.scored_tokens;
    }

    /// The metrics record of these totals (`None` when no step sampled).
    pub fn record(&self) -> Option<OnPolicyRecord> {
        (self.steps > 0).then(|| OnPolicyRecord {
            steps: self.steps,
            completion_len: self.new_tokens as f64 / self.samples.max(1) as f64,
            eos_rate: self.eos as f64 / self.samples.max(1) as f64,
            sample_nll: (self.scored_tokens > 0).then(|| self.teacher_nll / self.scored_tokens as f64),
            rollout_tokens_per_s: self.new_tokens as f64 / self.sample_seconds.max(1e-9),
            generation_share: self.sample_seconds / self.step_seconds.max(1e-9),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_keeps_exactly_the_sampled_tokens() {
        let dev = Device::Cpu;
        // Prompt of 3; the first sample stops at EOS (9) after 2 tokens, the second runs to the
        // end of a window of 6 (3 + 4 new - 1), the third sampled nothing.
        let prompts = vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 1]];
        let completions = vec![vec![5, 9], vec![1, 2, 3, 4], vec![]];
        let b = sampled_batch(&prompts, &completions, 6, Some(9), &dev).expect("batch");
        let ids: Vec<Vec<u32>> = b.input_ids.to_vec2().expect("ids");
        let targets: Vec<Vec<u32>> = b.targets.to_vec2().expect("targets");
        let mask: Vec<Vec<f32>> = b.mask.as_ref().expect("mask").to_vec2().expect("mask");
        assert_eq!(ids[0], [1, 2, 3, 5, 9, 9]);
        assert_eq!(targets[0], [2, 3, 5, 9, 9, 9]);
        // Targets 5 and 9 (the EOS) count; the prompt's own targets and the padding do not.
        assert_eq!(mask[0], [0., 0., 1., 1., 0., 0.]);
        assert_eq!(targets[1], [5, 6, 1, 2, 3, 4]);
        assert_eq!(mask[1], [0., 0., 1., 1., 1., 1.]);
        assert_eq!(mask[2], [0.; 6]);
        assert!(b.source.is_none(), "sampled windows are not windows of the data");
        let too_long = sampled_batch(&prompts[..1], &[vec![1, 2, 3, 4, 5]], 6, None, &dev);
        assert!(too_long.is_err());
    }

    #[test]
    fn teacher_nll_counts_only_masked_tokens_and_agrees_with_the_head_form() {
        let dev = Device::Cpu;
        let hidden = Tensor::new(&[[[1f32, 0.], [0., 1.], [1., 1.]]], &dev).expect("h");
        let weight = Tensor::new(&[[2f32, 0.], [0., 1.], [-1., 0.5]], &dev).expect("w");
        let logits = hidden.broadcast_matmul(&weight.t().expect("t")).expect("z");
        let batch = Batch {
            input_ids: Tensor::new(&[[0u32, 1, 2]], &dev).expect("ids"),
            targets: Tensor::new(&[[1u32, 2, 0]], &dev).expect("t"),
            mask: Some(Tensor::new(&[[0f32, 1., 1.]], &dev).expect("m")),
            source: None,
        };
        let z: Vec<Vec<f32>> = logits.get(0).expect("row").to_vec2().expect("z");
        let nll = |row: &[f32], y: usize| {
            let lse = row.iter().map(|x| (*x as f64).exp()).sum::<f64>().ln();
            lse - row[y] as f64
        };
        let want = nll(&z[1], 2) + nll(&z[2], 0);
        let dense = teacher_nll(&Outputs::logits_only(logits.clone()), &batch).expect("dense");
        let head = retort_plugins::models::lm_head_outputs(hidden, weight, Default::default()).expect("head");
        let by_head = teacher_nll(&head, &batch).expect("head");
        assert_eq!(dense.1, 2);
        assert!((dense.0 - want).abs() < 1e-5, "{} vs {want}", dense.0);
        assert!((by_head.0 - want).abs() < 1e-5, "{} vs {want}", by_head.0);
    }
}
