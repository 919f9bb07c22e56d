//! Which tokenizer a model checkpoint was trained with, for every model kind: the model's own
//! answer (a GGUF file, a loader that reads it), else the files beside its weights: a Hugging
//! Face `tokenizer.json`, or retort's record (`artifacts::tokenizer_record`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use retort_core::{Result, Tokenizer};
use retort_plugins::tokenizers::hf::HfTokenizer;

use crate::artifacts::tokenizer_record;

/// The checkpoint a model's params name: `checkpoint`, else `init.checkpoint`.
pub fn checkpoint_of(params: &Map<String, Value>) -> Option<PathBuf> {
    let direct = params.get("checkpoint").and_then(Value::as_str);
    let init = params
        .get("init")
        .and_then(|i| i.get("checkpoint"))
        .and_then(Value::as_str);
    direct.or(init).map(PathBuf::from)
}

/// The tokenizer identity of a model: `reported` by the model, else read beside the weights in
/// `checkpoint` (a directory); `None` when nothing says.
pub fn of_checkpoint(reported: Option<String>, checkpoint: Option<&Path>) -> Result<Option<String>> {
    if reported.is_some() {
        return Ok(reported);
    }
    let Some(dir) = checkpoint.filter(|p| p.is_dir()) else {
        return Ok(None);
    };
    let json = dir.join("tokenizer.json");
    if json.is_file() {
        return HfTokenizer::from_json_file(&json).map(|t| Some(t.identity()));
    }
    tokenizer_record::read(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_plugins::tokenizers::char_level::CharTokenizer;

    #[test]
    fn the_model_is_asked_first_then_the_files_beside_its_weights() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(of_checkpoint(None, Some(d.path())).expect("none"), None);
        let t = CharTokenizer::from_corpus("abc");
        tokenizer_record::write(d.path(), &t).expect("write");
        assert_eq!(of_checkpoint(None, Some(d.path())).expect("read"), Some(t.identity()));
        let reported = of_checkpoint(Some("gguf".into()), Some(d.path())).expect("reported");
        assert_eq!(reported, Some("gguf".into()));
    }

    #[test]
    fn the_checkpoint_is_taken_from_the_params_or_their_init() {
        let p = |v: Value| v.as_object().expect("object").clone();
        assert_eq!(
            checkpoint_of(&p(serde_json::json!({"checkpoint": "a"}))),
            Some("a".into())
        );
        let init = checkpoint_of(&p(serde_json::json!({"init": {"checkpoint": "b"}})));
        assert_eq!(init, Some("b".into()));
        assert_eq!(checkpoint_of(&p(serde_json::json!({"n_layer": 2}))), None);
    }
}
