//! `[eval.generation]` checked against the run and resolved into what the evaluation samples.

use retort_core::config::{GenerationEvalSpec, RunConfig};
use retort_core::{DataSource, Error, Result, Split};
use retort_plugins::models::generate::Sampling;

use super::prompts::PromptPool;

/// How every model of the run is asked to generate for the report.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationPlan {
    /// Prompts: the starts of the first `prompts` validation windows, or as many of the
    /// data's validation prompts.
    pub prompts: usize,
    /// Tokens of each prompt (at most, for the data's prompts).
    pub prompt_tokens: usize,
    /// The validation prompts the data gives (`None`: the starts of windows).
    pub pool: Option<PromptPool>,
    /// How to sample (the same seed for every model).
    pub sampling: Sampling,
    /// End-of-sequence id a sample stops at.
    pub eos: Option<u32>,
}

impl GenerationPlan {
    /// The plan of `eval.generation` (by default on, with its defaults, when `[on_policy]` is
    /// set), or an error naming the key; `val_tokens`: length of `data`'s validation split.
    pub fn resolve(config: &RunConfig, data: &dyn DataSource, val_tokens: usize) -> Result<Option<Self>> {
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
        let pool = match data.prompts(Split::Val) {
            Some(p) => Some(PromptPool::new(p, prompt_tokens).ok_or_else(|| {
                Error::config(
                    "eval.generation",
                    format!("the data ({}) gives no non-empty validation prompt", data.describe()),
                )
            })?),
            None => None,
        };
        let available = match &pool {
            Some(p) => Available::Prompts(p.len()),
            None => Available::Windows(val_tokens),
        };
        check(&spec, prompt_tokens, seq_len, available)?;
        Ok(Some(GenerationPlan {
            prompts: spec.prompts,
            prompt_tokens,
            pool,
            sampling: Sampling {
                max_tokens: spec.max_new_tokens.unwrap_or(seq_len + 1 - prompt_tokens),
                temperature: spec.temperature,
                top_p: spec.top_p,
                top_k: spec.top_k,
                seed: super::seeds::generation_eval(config.run.seed),
            },
            eos: data.tokenizer().eos_id(),
        }))
    }

    /// Tokens of a sampled window (prompt and new tokens but the last).
    pub fn window(&self) -> usize {
        self.prompt_tokens + self.sampling.max_tokens - 1
    }
}

/// Where the prompts come from: the validation split's windows (its tokens), or the data's own
/// prompts (their number).
enum Available {
    Windows(usize),
    Prompts(usize),
}

fn check(s: &GenerationEvalSpec, prompt_tokens: usize, seq_len: usize, available: Available) -> Result<()> {
    let key = |k: &str| format!("eval.generation.{k}");
    let (most, why) = match available {
        Available::Windows(val_tokens) => (
            val_tokens / seq_len,
            format!(
                "prompts are the starts of validation windows of train.seq_len = {seq_len} tokens, and the \
                 validation split has {val_tokens} tokens"
            ),
        ),
        Available::Prompts(n) => (n, format!("the data gives {n} non-empty validation prompts")),
    };
    if !(1..=most).contains(&s.prompts) {
        return Err(Error::config(
            key("prompts"),
            format!("expected an integer in [1, {most}] ({why}), got {}", s.prompts),
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
