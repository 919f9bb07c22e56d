//! `[on_policy]` checked against the run and resolved into the plan the training loop follows.

use retort_core::config::{OnPolicySection, RunConfig};
use retort_core::{DataSource, Error, Result, Split, Teacher};
use retort_plugins::models::generate::Sampling;

use super::prompts::PromptPool;
use super::TermSlot;

/// Which steps sample, from which model, how, and what part of each window is the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct OnPolicyPlan {
    /// Fraction of the steps on sampled sequences.
    pub lambda: f64,
    /// Prompt tokens (the start of each training window), or at most that many of each prompt
    /// the data gives.
    pub prompt_tokens: usize,
    /// The training prompts the data gives (`None`: prompts are the starts of the windows).
    pub prompts: Option<PromptPool>,
    /// How to sample (`max_tokens`: new tokens per prompt at most; the seed is per micro-batch).
    pub sampling: Sampling,
    /// Sample from the teacher (sequence-level KD) instead of the student.
    pub seq_kd: bool,
    /// End-of-sequence id a sample stops at.
    pub eos: Option<u32>,
    /// Base seed of the samples.
    pub seed: u64,
}

impl OnPolicyPlan {
    /// The plan of `config.on_policy`, or an error naming the key that cannot work with the rest
    /// of the run. `terms` are the distillation's; `teacher` the one loaded at assembly (`None`:
    /// pretrained in the run, a model that can score any window).
    pub fn resolve(
        config: &RunConfig,
        terms: &[TermSlot],
        teacher: Option<&dyn Teacher>,
        data: &dyn DataSource,
    ) -> Result<Option<Self>> {
        let Some(s) = &config.on_policy else {
            check_no_sample_terms(terms, "there is no [on_policy] section")?;
            return Ok(None);
        };
        let seq_len = config.train.seq_len;
        let prompt_tokens = s.prompt_tokens.unwrap_or((seq_len / 2).max(1));
        check_numbers(s, prompt_tokens, seq_len)?;
        let longest = seq_len + 1 - prompt_tokens;
        if let Some(t) = teacher.filter(|t| t.sparse_topk().is_some() || t.aligned_windows().is_some()) {
            return Err(Error::config(
                "on_policy",
                format!(
                    "the teacher ({}) serves stored outputs of the data's windows and cannot score sampled \
                     sequences: use a teacher model (or remove [on_policy])",
                    t.describe()
                ),
            ));
        }
        let lambdas = super::stages::stage_lambdas(config, s.lambda);
        if lambdas.iter().any(|&(_, l)| l < 1.0) || s.seq_kd {
            let why = if s.seq_kd {
                "on_policy.seq_kd = true samples from the teacher"
            } else {
                "on_policy.lambda (or a stage's on_policy_lambda) < 1 trains some steps on the data"
            };
            check_no_sample_terms(terms, why)?;
        }
        let truncated = s.temperature != 1.0 || s.top_p < 1.0 || s.top_k > 0;
        if let Some(t) = terms
            .iter()
            .find(|t| t.term.needs_student_samples())
            .filter(|_| truncated)
        {
            tracing::warn!(
                "term `{}` estimates the reverse KL from samples of the student's own distribution; \
                 on_policy samples at temperature {} with top-p {} and top-k {}, so its estimate is biased",
                t.name,
                s.temperature,
                s.top_p,
                s.top_k
            );
        }
        let prompts = match data.prompts(Split::Train) {
            Some(p) => Some(PromptPool::new(p, prompt_tokens).ok_or_else(|| {
                Error::config(
                    "on_policy",
                    format!(
                        "the data ({}) gives no non-empty training prompt to sample from",
                        data.describe()
                    ),
                )
            })?),
            None => None,
        };
        Ok(Some(OnPolicyPlan {
            lambda: s.lambda,
            prompt_tokens,
            prompts,
            sampling: Sampling {
                max_tokens: s.max_new_tokens.unwrap_or(longest),
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                seed: 0,
            },
            seq_kd: s.seq_kd,
            eos: data.tokenizer().eos_id().filter(|_| s.stop_at_eos),
            seed: super::seeds::on_policy_samples(config.run.seed),
        }))
    }

    /// Whether step `step` (counted from 0 over the phase) trains on samples: the steps where
    /// `floor(step * lambda)` grows, spread evenly, `lambda` of them in all.
    pub fn on_step(&self, step: usize) -> bool {
        Self::samples_at(self.lambda, step)
    }

    /// Whether step `step` (from 0) of a stretch with fraction `lambda` samples.
    pub fn samples_at(lambda: f64, step: usize) -> bool {
        let at = |s: usize| (s as f64 * lambda).floor();
        at(step + 1) > at(step)
    }

    /// On-policy steps of the student phase of `config`, stage by stage.
    pub fn sampled_steps(&self, config: &RunConfig) -> usize {
        let lambdas = super::stages::stage_lambdas(config, self.lambda);
        let per_stage = lambdas
            .iter()
            .map(|&(n, l)| (0..n).filter(|&s| Self::samples_at(l, s)).count());
        per_stage.sum()
    }

    /// Tokens of a sampled window: the prompt and the new tokens but the last (a window's
    /// targets are its tokens shifted by one).
    pub fn window(&self) -> usize {
        self.prompt_tokens + self.sampling.max_tokens - 1
    }

    /// How to sample micro-batch `micro` of step `step`: its own seed, a function of the run
    /// seed, the step and the micro-batch only (so that a resumed run samples the same).
    pub fn sampling_at(&self, step: usize, micro: usize) -> Sampling {
        let mut x = self.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= (micro as u64).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        Sampling {
            seed: x ^ (x >> 29),
            ..self.sampling
        }
    }
}

impl std::fmt::Display for OnPolicyPlan {
    /// `the student's samples: prompts of 8 tokens + up to 9 sampled at temperature 1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.sampling;
        let who = if self.seq_kd { "teacher" } else { "student" };
        match &self.prompts {
            Some(pool) => write!(
                f,
                "the {who}'s samples: the data's prompts ({} of {:.1} tokens on average, at most {}) + up to {} \
                 sampled at temperature {}",
                pool.len(),
                pool.mean_len(),
                self.prompt_tokens,
                s.max_tokens,
                s.temperature
            )?,
            None => write!(
                f,
                "the {who}'s samples: prompts of {} tokens + up to {} sampled at temperature {}",
                self.prompt_tokens, s.max_tokens, s.temperature
            )?,
        }
        if s.top_p < 1.0 {
            write!(f, ", top-p {}", s.top_p)?;
        }
        if s.top_k > 0 {
            write!(f, ", top-k {}", s.top_k)?;
        }
        match self.eos {
            Some(id) => write!(f, ", stopping at end of sequence (id {id})"),
            None => write!(f, " (no end-of-sequence token)"),
        }
    }
}

/// `lambda`, `prompt_tokens`, `max_new_tokens`, `temperature` and `top_p` in their ranges.
fn check_numbers(s: &OnPolicySection, prompt_tokens: usize, seq_len: usize) -> Result<()> {
    if !(s.lambda.is_finite() && (0.0..=1.0).contains(&s.lambda)) {
        return Err(Error::config(
            "on_policy.lambda",
            format!(
                "expected the fraction of steps on samples, a number in [0, 1], got {}",
                s.lambda
            ),
        ));
    }
    if !(1..=seq_len).contains(&prompt_tokens) {
        return Err(Error::config(
            "on_policy.prompt_tokens",
            format!("expected an integer in [1, train.seq_len = {seq_len}], got {prompt_tokens}"),
        ));
    }
    let longest = seq_len + 1 - prompt_tokens;
    if let Some(n) = s.max_new_tokens.filter(|n| !(1..=longest).contains(n)) {
        return Err(Error::config(
            "on_policy.max_new_tokens",
            format!(
                "expected an integer in [1, train.seq_len + 1 - prompt_tokens = {longest}] (a sampled window is at \
                 most train.seq_len tokens), got {n}"
            ),
        ));
    }
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(Error::config(
            "on_policy.temperature",
            format!("expected a number >= 0 (0: greedy), got {}", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::config(
            "on_policy.top_p",
            format!("expected a number in (0, 1], got {}", s.top_p),
        ));
    }
    Ok(())
}

/// Refuses a term whose estimator assumes the student's own samples when some step does not
/// train on them (`why`).
fn check_no_sample_terms(terms: &[TermSlot], why: &str) -> Result<()> {
    match terms.iter().position(|t| t.term.needs_student_samples()) {
        Some(i) => Err(Error::config(
            format!("loss[{i}]"),
            format!(
                "term `{}` estimates a divergence from tokens the student sampled itself, and {why}: use it \
                 with [on_policy] lambda = 1 and seq_kd = false, or use a dense term (kl, reverse_kl, jsd, ...)",
                terms[i].name
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(lambda: f64) -> OnPolicyPlan {
        OnPolicyPlan {
            lambda,
            prompt_tokens: 4,
            prompts: None,
            sampling: Sampling::default(),
            seq_kd: false,
            eos: None,
            seed: 7,
        }
    }

    #[test]
    fn lambda_of_the_steps_sample_spread_evenly() {
        for (lambda, n, want) in [
            (0.0, 100, 0),
            (1.0, 100, 100),
            (0.5, 100, 50),
            (0.3, 100, 30),
            (0.25, 8, 2),
        ] {
            let p = plan(lambda);
            let on: Vec<usize> = (0..n).filter(|&s| p.on_step(s)).collect();
            assert_eq!(on.len(), want, "lambda {lambda}: {on:?}");
            // No two on-policy steps closer than 1 / lambda - 1 apart.
            if lambda > 0.0 && lambda < 1.0 {
                let gap = (1.0 / lambda).floor() as usize;
                assert!(on.windows(2).all(|w| w[1] - w[0] >= gap), "lambda {lambda}: {on:?}");
            }
        }
        assert_eq!(
            (0..4).map(|s| plan(0.5).on_step(s)).collect::<Vec<_>>(),
            [false, true, false, true]
        );
    }

    #[test]
    fn every_micro_batch_of_every_step_has_its_own_seed() {
        let p = plan(1.0);
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..50 {
            for micro in 0..4 {
                assert!(
                    seen.insert(p.sampling_at(step, micro).seed),
                    "step {step} micro {micro}"
                );
            }
        }
        assert_eq!(p.sampling_at(3, 1), p.sampling_at(3, 1));
    }
}
