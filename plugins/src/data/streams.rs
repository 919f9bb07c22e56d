//! Train and validation token streams held in memory: what `text`, `jsonl` and `synthetic`
//! produce once their corpus is tokenized.

use retort_core::{DataSource, Params, Result, Split, Tokenizer};

/// Tokenized prompts, one per record.
pub type Prompts = Vec<Vec<u32>>;

/// A tokenizer with its train and validation streams.
pub struct TokenStreams {
    /// The tokenizer the ids come from.
    pub tokenizer: Box<dyn Tokenizer>,
    /// Training ids.
    pub train: Vec<u32>,
    /// Validation ids.
    pub val: Vec<u32>,
    /// One-line description.
    pub description: String,
    /// Prompts the data gives, `(train, val)`, tokenized (see [`DataSource::prompts`]).
    pub prompts: Option<(Prompts, Prompts)>,
}

impl DataSource for TokenStreams {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }
    fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn prompts(&self, split: Split) -> Option<&[Vec<u32>]> {
        let (train, val) = self.prompts.as_ref()?;
        Some(match split {
            Split::Train => train,
            Split::Val => val,
        })
    }
}

/// Checks a `val_fraction` param: a number in `(0, 0.5]`.
pub fn check_val_fraction(params: &Params, v: f64) -> Result<()> {
    if v > 0.0 && v <= 0.5 {
        Ok(())
    } else {
        Err(params.error("val_fraction", format!("expected a number in (0, 0.5], got {v}")))
    }
}
