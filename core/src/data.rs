//! Data sources and tokenizers.

use crate::Result;

/// Which part of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training split.
    Train,
    /// Validation split.
    Val,
}

/// Turns text into token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Number of distinct ids.
    fn vocab_size(&self) -> usize;
    /// Encodes `text`; unknown symbols are an error.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Decodes ids.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// A stable identity (kind and a hash of the vocabulary) for compatibility checks.
    fn identity(&self) -> String;
    /// Id of the beginning-of-sequence token, if the vocabulary has one.
    fn bos_id(&self) -> Option<u32> {
        None
    }
    /// Id of the end-of-sequence token, if the vocabulary has one.
    fn eos_id(&self) -> Option<u32> {
        None
    }
    /// Id of the padding token, if the vocabulary has one.
    fn pad_id(&self) -> Option<u32> {
        None
    }
    /// Whether a prompt starts with the beginning-of-sequence token.
    fn add_bos(&self) -> bool {
        false
    }
    /// The tokenizer as a Hugging Face `tokenizer.json`, when it can be written as one (saved
    /// beside an exported model).
    fn hf_json(&self) -> Option<String> {
        None
    }
}

/// A tokenized corpus split deterministically into train and validation token streams.
pub trait DataSource: Send + Sync {
    /// The tokenizer the ids come from.
    fn tokenizer(&self) -> &dyn Tokenizer;
    /// The token stream of `split`.
    fn tokens(&self, split: Split) -> &[u32];
    /// One-line human description.
    fn describe(&self) -> String;
    /// The source's true distribution, when the source knows it (a synthetic generator): exact
    /// scores of any token sequence, e.g. to measure the true NLL of a student's generations.
    /// `None` (the default) for sources of real data, whose distribution nobody knows.
    fn likelihood(&self) -> Option<&dyn SourceLikelihood> {
        None
    }
    /// Prompts the data gives for `split` (e.g. a prompt field of each JSON record), tokenized
    /// without special tokens, in the data's order: what on-policy steps and the generation
    /// evaluation continue. `None` (the default): prompts are cut from the start of windows.
    fn prompts(&self, split: Split) -> Option<&[Vec<u32>]> {
        let _ = split;
        None
    }
}

/// The true distribution of a source that knows it (a synthetic generator): exact scores of any token sequence.
pub trait SourceLikelihood: Send + Sync {
    /// `-log p(continuation | prompt)` in nats, summed over the continuation's tokens, under the source,
    /// marginalising whatever the source hides (for `synthetic`: the regime). An error if the prompt is too short
    /// to condition on or an id is outside the vocabulary.
    fn continuation_nll(&self, prompt: &[u32], continuation: &[u32]) -> Result<f64>;
}
