//! A model given by a path (`retort generate --model`, `retort eval --model`): a GGUF file, a
//! Hugging Face directory (llama family or GPT-2) or a retort export, loaded frozen with the
//! tokenizer that comes with it (GGUF metadata, or `tokenizer.json` in the directory).

use std::path::Path;

use retort_core::{BuildContext, Error, Params, Registry, Result, Teacher, Tokenizer};

/// Which teacher kind reads `path`: `llama` for GGUF files and llama-family directories,
/// `transformer` for GPT-2 directories.
pub fn kind_of(path: &Path) -> Result<&'static str> {
    let what = || format!("--model {}", path.display());
    if retort_plugins::formats::gguf::is_gguf(path) {
        return Ok("llama");
    }
    if !path.is_dir() {
        return Err(Error::input(what(), "is neither a GGUF file nor a model directory"));
    }
    let cfg = path.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .map_err(|e| Error::input_failed(what(), format!("cannot read {}", cfg.display()), e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::input_failed(what(), format!("{} is not JSON", cfg.display()), e))?;
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("gpt2") => Ok("transformer"),
        Some("llama" | "qwen2" | "mistral" | "mixtral") => Ok("llama"),
        other => Err(Error::input(what(), format!("unsupported model_type {other:?}"))),
    }
}

/// A model file or directory with the tokenizer that comes with it, loaded as a frozen model.
pub fn load_model_file(
    registry: &Registry,
    path: &Path,
    device: &candle_core::Device,
    context: Option<usize>,
) -> Result<(Box<dyn Teacher>, Box<dyn Tokenizer>)> {
    let kind = kind_of(path)?;
    let ctx = BuildContext::new(registry, device.clone(), 0);
    let tokenizer = load_tokenizer(registry, path, &ctx)?;
    let mut mp = serde_json::Map::new();
    mp.insert("checkpoint".into(), path.display().to_string().into());
    if kind == "llama" {
        // RoPE tables only as long as needed.
        mp.insert("context".into(), context.unwrap_or(2048).into());
    }
    let model = registry.teachers.build(kind, &Params::new("model", mp), &ctx)?;
    check_vocab(path, model.vocab_size(), tokenizer.vocab_size())?;
    Ok((model, tokenizer))
}

/// The model at `path` has an embedding row for every token of its tokenizer (a padded model
/// may have more).
pub fn check_vocab(path: &Path, rows: usize, tokens: usize) -> Result<()> {
    if rows < tokens {
        return Err(Error::input(
            format!("--model {}", path.display()),
            format!(
                "its embedding has {rows} rows, fewer than the {tokens} tokens of its tokenizer: a token id past \
                 row {rows} has no embedding (is the tokenizer the model's own?)"
            ),
        ));
    }
    Ok(())
}

/// The tokenizer that comes with the model at `path`.
pub fn load_tokenizer(registry: &Registry, path: &Path, ctx: &BuildContext) -> Result<Box<dyn Tokenizer>> {
    let tok_params = Params::new(
        "tokenizer",
        serde_json::json!({"path": path})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    let what = || format!("--model {}", path.display());
    let err = match registry.tokenizers.build("hf", &tok_params, ctx) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let recorded = path.is_dir() && !path.join("tokenizer.json").exists();
    if let Some(identity) = recorded
        .then(|| crate::artifacts::tokenizer_record::read(path))
        .transpose()?
        .flatten()
    {
        return Err(Error::input(
            what(),
            format!(
                "it was trained with tokenizer `{identity}`, which is not stored with it (a char-level \
                 vocabulary comes from its training text); evaluate it in a run config as \
                 `teacher.checkpoint` with the data it was trained on"
            ),
        ));
    }
    Err(Error::input_failed(
        what(),
        "no usable tokenizer with the model (GGUF metadata or tokenizer.json)",
        err,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_whose_tokenizer_is_only_recorded_says_so() {
        let d = tempfile::tempdir().expect("tmp");
        let t = retort_plugins::tokenizers::char_level::CharTokenizer::from_corpus("abc");
        crate::artifacts::tokenizer_record::write(d.path(), &t).expect("record");
        let registry = crate::builtin_registry().expect("registry");
        let ctx = BuildContext::new(&registry, candle_core::Device::Cpu, 0);
        let err = load_tokenizer(&registry, d.path(), &ctx)
            .err()
            .expect("no tokenizer.json");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains(&t.identity()) && msg.contains("teacher.checkpoint"),
            "{msg}"
        );
    }

    #[test]
    fn fewer_rows_than_tokens_are_refused_naming_both() {
        let p = Path::new("m.gguf");
        assert!(check_vocab(p, 262, 262).is_ok());
        assert!(check_vocab(p, 320, 262).is_ok());
        let err = check_vocab(p, 100, 262).expect_err("short embedding");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("--model m.gguf") && msg.contains("100 rows") && msg.contains("262 tokens"),
            "{msg}"
        );
    }
}
