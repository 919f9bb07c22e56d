//! `retort_tokenizer.json`: which tokenizer an exported model was trained with (its identity and
//! size), written beside the weights of every model retort exports. For a tokenizer with a
//! Hugging Face form `tokenizer.json` says the same; for a character-level one it is the only
//! record.

use std::path::Path;

use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Error, Result, Tokenizer};

/// The record's file name.
pub const RECORD: &str = "retort_tokenizer.json";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// [`Tokenizer::identity`].
    identity: String,
    /// Its number of tokens.
    vocab_size: usize,
}

/// Writes the record of `tokenizer` into the model directory `dir`.
pub fn write(dir: &Path, tokenizer: &dyn Tokenizer) -> Result<()> {
    let record = Record {
        identity: tokenizer.identity(),
        vocab_size: tokenizer.vocab_size(),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::failed("serialising the tokenizer record", e))?;
    fsutil::write_atomic(&dir.join(RECORD), &json)
}

/// The tokenizer identity recorded in the model directory `dir`, if it has a record.
pub fn read(dir: &Path) -> Result<Option<String>> {
    let file = dir.join(RECORD);
    if !file.is_file() {
        return Ok(None);
    }
    let what = format!("tokenizer record {}", file.display());
    let text = std::fs::read_to_string(&file).map_err(|e| Error::input_failed(what.clone(), "unreadable", e))?;
    let record: Record = serde_json::from_str(&text).map_err(|e| Error::input_failed(what, "corrupted", e))?;
    Ok(Some(record.identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_plugins::tokenizers::char_level::CharTokenizer;

    #[test]
    fn round_trips_and_refuses_a_corrupted_record() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(read(d.path()).expect("none"), None);
        let t = CharTokenizer::from_corpus("abc");
        write(d.path(), &t).expect("write");
        assert_eq!(read(d.path()).expect("read"), Some(t.identity()));
        std::fs::write(d.path().join(RECORD), "{").expect("w");
        assert_eq!(read(d.path()).expect_err("corrupted").exit_code(), 2);
    }
}
