//! What a model generates, scored ([`GenerationPlan`]): every model of the run continues the
//! same validation prompts with the same seed; the teacher scores the sampled tokens, and a
//! data source that knows its true distribution scores them exactly.

use candle_core::Device;

use retort_core::{Result, SourceLikelihood, TapSet, Teacher};

use crate::artifacts::report::GenerationResult;
use crate::assemble::GenerationPlan;
use crate::engine::rollout::{sampled_batch, teacher_nll, SampleModel};

/// The prompts of the evaluation and how their continuations are scored.
pub struct GenerationEval<'a> {
    plan: &'a GenerationPlan,
    /// The prompts in the batches they are continued in (one length per batch).
    batches: Vec<Vec<Vec<u32>>>,
    likelihood: Option<&'a dyn SourceLikelihood>,
    device: Device,
}

impl<'a> GenerationEval<'a> {
    /// Prompts from the starts of the first `plan.prompts` windows of `val` (`seq_len` tokens
    /// apart), or spread over the data's prompts when the plan has them; continued
    /// `batch_size` at a time on `device`.
    pub fn new(
        plan: &'a GenerationPlan,
        val: &[u32],
        seq_len: usize,
        batch_size: usize,
        likelihood: Option<&'a dyn SourceLikelihood>,
        device: Device,
    ) -> Self {
        let batches = match &plan.pool {
            Some(pool) => pool.spread(plan.prompts, batch_size),
            None => {
                let prompts: Vec<Vec<u32>> = (0..plan.prompts)
                    .map(|i| val[i * seq_len..i * seq_len + plan.prompt_tokens].to_vec())
                    .collect();
                prompts.chunks(batch_size.max(1)).map(<[_]>::to_vec).collect()
            }
        };
        GenerationEval {
            plan,
            batches,
            likelihood,
            device,
        }
    }

    /// The continuations of `model`, scored by `teacher` (unless it only serves stored outputs)
    /// and by the source's true distribution when the data has one.
    pub fn score(&self, model: SampleModel, teacher: &dyn Teacher) -> Result<GenerationResult> {
        let scores_windows = teacher.sparse_topk().is_none() && teacher.aligned_windows().is_none();
        let mut totals = Totals::default();
        for (chunk, prompts) in self.batches.iter().enumerate() {
            let mut sampling = self.plan.sampling;
            sampling.seed = sampling.seed.wrapping_add(chunk as u64);
            let completions = model.continue_prompts(prompts, self.plan.eos, &sampling, &self.device)?;
            totals.samples += completions.len();
            totals.tokens += completions.iter().map(Vec::len).sum::<usize>();
            totals.eos += completions
                .iter()
                .filter(|c| self.plan.eos.is_some() && c.last().copied() == self.plan.eos)
                .count();
            if scores_windows {
                let batch = sampled_batch(prompts, &completions, self.plan.window(), self.plan.eos, &self.device)?;
                let (nll, _) = teacher_nll(&teacher.forward(&batch, &TapSet::none())?, &batch)?;
                totals.teacher_nll += nll;
            }
            if let Some(l) = self.likelihood {
                for (p, c) in prompts.iter().zip(&completions) {
                    totals.true_nll += l.continuation_nll(p, c)?;
                }
            }
        }
        let per_token = |sum: f64| sum / totals.tokens.max(1) as f64;
        Ok(GenerationResult {
            samples: totals.samples,
            completion_len: totals.tokens as f64 / totals.samples.max(1) as f64,
            eos_rate: totals.eos as f64 / totals.samples.max(1) as f64,
            teacher_nll: scores_windows.then(|| per_token(totals.teacher_nll)),
            true_nll: self.likelihood.map(|_| per_token(totals.true_nll)),
        })
    }
}

#[derive(Default)]
struct Totals {
    samples: usize,
    tokens: usize,
    eos: usize,
    teacher_nll: f64,
    true_nll: f64,
}
