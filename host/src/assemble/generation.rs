//! `[eval.generation]` checked against the run and resolved into what the evaluation samples.

use retort_core::config::{GenerationEvalSpec, RunConfig};
use retort_core::{Error, Result, Tokenizer};
use retort_plugins::models::generate::Sampling;

/// How every model of the run is asked to generate for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationPlan {
    /// Prompts: the starts of the first `prompts` validation windows.
    pub prompts: usize,
    /// Tokens of each prompt.
    pub prompt_tokens: usize,
    /// How to sample (the same seed for every model).
    pub sampling: Sampling,
    /// End-of-sequence id a sample stops at.
    pub eos: Option<u32>,
}

impl GenerationPlan {
    /// The plan of `eval.generation` (by default on, with its defaults, when `[on_policy]` is
    /// set), or an error naming the key; `val_tokens`: length of the validation split.
    pub fn resolve(config: &RunConfig, tokenizer: &dyn Tokenizer, val_tokens: usize) -> Result<Option<Self>> {
        let spec = match (&config.eval.generation, &config.on_policy) {
            (Some(s), _) => s.clone(),
            (None, Some(_)) => GenerationEvalSpec::default(),
            (None, None) => return Ok(None),
        };
        let seq_len = config.train.seq_len;
        // By default the evaluation asks for what on-policy training samples.
        let on_policy = config.on_policy.as_ref();
        let same_prompt = spec.prompt_tokens.is_none();
        let prompt_tokens = spec
            .prompt_tokens
            .or(on_policy.and_then(|o| o.prompt_tokens))
            .unwrap_or((seq_len / 2).max(1));
        let mut spec = spec;
        if same_prompt && spec.max_new_tokens.is_none() {
            spec.max_new_tokens = on_policy.and_then(|o| o.max_new_tokens);
        }
        check(&spec, prompt_tokens, seq_len, val_tokens)?;
        Ok(Some(GenerationPlan {
            prompts: spec.prompts,
            prompt_tokens,
            sampling: Sampling {
                max_tokens: spec.max_new_tokens.unwrap_or(seq_len + 1 - prompt_tokens),
                temperature: spec.temperature,
                top_p: spec.top_p,
                top_k: spec.top_k,
                seed: super::seeds::generation_eval(config.run.seed),
            },
            eos: tokenizer.eos_id(),
        }))
    }

    /// Tokens of a sampled window (prompt and new tokens but the last).
    pub fn window(&self) -> usize {
        self.prompt_tokens + self.sampling.max_tokens - 1
    }
}

fn check(s: &GenerationEvalSpec, prompt_tokens: usize, seq_len: usize, val_tokens: usize) -> Result<()> {
    let key = |k: &str| format!("eval.generation.{k}");
    let windows = val_tokens / seq_len;
    if !(1..=windows).contains(&s.prompts) {
        return Err(Error::config(
            key("prompts"),
            format!(
                "expected an integer in [1, {windows}] (prompts are the starts of validation windows of train.seq_len \
                 = {seq_len} tokens, and the validation split has {val_tokens} tokens), got {}",
                s.prompts
            ),
        ));
    }
    if !(1..=seq_len).contains(&prompt_tokens) {
        return Err(Error::config(
            key("prompt_tokens"),
            format!("expected an integer in [1, train.seq_len = {seq_len}], got {prompt_tokens}"),
        ));
    }
    let longest = seq_len + 1 - prompt_tokens;
    if let Some(n) = s.max_new_tokens.filter(|n| !(1..=longest).contains(n)) {
        return Err(Error::config(
            key("max_new_tokens"),
            format!("expected an integer in [1, train.seq_len + 1 - prompt_tokens = {longest}], got {n}"),
        ));
    }
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(Error::config(
            key("temperature"),
            format!("expected a number >= 0 (0: greedy), got {}", s.temperature),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::config(
            key("top_p"),
            format!("expected a number in (0, 1], got {}", s.top_p),
        ));
    }
    Ok(())
}
