//! Tokenizer `char`: one id per distinct character of the corpus, ids in sorted character order.
//!
//! ```toml
//! tokenizer = { kind = "char" }
//! ```

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, Params, Result, Tokenizer};

/// Character-level tokenizer.
pub struct CharTokenizer {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
    identity: String,
}

impl CharTokenizer {
    /// The vocabulary of `corpus`.
    pub fn from_corpus(corpus: &str) -> Self {
        let chars: Vec<char> = corpus.chars().collect::<BTreeSet<_>>().into_iter().collect();
        let ids = chars.iter().enumerate().map(|(i, c)| (*c, i as u32)).collect();
        let mut h = Sha256::new();
        h.update(chars.iter().collect::<String>().as_bytes());
        let digest = h.finalize();
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        CharTokenizer {
            identity: format!("char:{}:{hex}", chars.len()),
            chars,
            ids,
        }
    }
}

impl Tokenizer for CharTokenizer {
    fn vocab_size(&self) -> usize {
        self.chars.len()
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.ids.get(&c).copied().ok_or_else(|| {
                    Error::input(
                        "text",
                        format!("character {c:?} at offset {i} is not in the vocabulary"),
                    )
                })
            })
            .collect()
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&i| {
                self.chars.get(i as usize).copied().ok_or_else(|| {
                    Error::Runtime(format!(
                        "token id {i} is outside the vocabulary of {}",
                        self.chars.len()
                    ))
                })
            })
            .collect()
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Tokenizer>> {
    params.parse::<NoParams>()?;
    let corpus = ctx.corpus.ok_or_else(|| {
        params.error(
            "kind",
            "the char tokenizer learns its vocabulary from a corpus; none was given",
        )
    })?;
    Ok(Box::new(CharTokenizer::from_corpus(corpus)))
}

inventory::submit! {
    Factory::<dyn Tokenizer> { kind: "char", description: "one id per distinct character of the corpus", build, params: retort_core::registry::no_params }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_unknown_chars() {
        let t = CharTokenizer::from_corpus("hello world");
        assert_eq!(t.vocab_size(), 8); // ' ' d e h l o r w
        let ids = t.encode("lower").expect("enc");
        assert_eq!(ids, vec![4, 5, 7, 2, 6]);
        assert_eq!(t.decode(&ids).expect("dec"), "lower");
        assert!(t.encode("hex").is_err());
        assert_eq!(t.identity(), CharTokenizer::from_corpus("world hello").identity());
        assert_ne!(t.identity(), CharTokenizer::from_corpus("hello").identity());
    }
}
