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
}
