//! Data kind `text`: a UTF-8 file, or every file of a directory (sorted by name, joined by a
//! newline), tokenized once; the first `1 - val_fraction` of the tokens train, the rest validate.
//!
//! ```toml
//! [data]
//! kind = "text"
//! path = "../shared/data/tinyshakespeare.txt"
//! val_fraction = 0.1
//! tokenizer = { kind = "char" }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use retort_core::config::ComponentSpec;
use retort_core::registry::Factory;

use super::streams::{check_val_fraction, TokenStreams};
use retort_core::{BuildContext, DataSource, Error, Params, Result};

/// Params of `text`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TextParams {
    /// A text file or a directory of text files. Required.
    pub path: PathBuf,
    /// Fraction of tokens held out for validation, in `(0, 0.5]`. Default 0.1.
    #[serde(default = "default_val")]
    pub val_fraction: f64,
    /// Tokenizer. Default `{ kind = "char" }`.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: ComponentSpec,
}

fn default_val() -> f64 {
    0.1
}
fn default_tokenizer() -> ComponentSpec {
    ComponentSpec::new("char")
}

fn read_corpus(path: &Path, key: &str) -> Result<String> {
    let what = || format!("{key} = \"{}\"", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::input_failed(what(), "cannot read", e))?;
    let files: Vec<PathBuf> = if meta.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::input_failed(what(), "cannot list directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(Error::input(what(), "directory holds no files"));
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut parts = Vec::with_capacity(files.len());
    for f in &files {
        let bytes =
            std::fs::read(f).map_err(|e| Error::input_failed(what(), format!("cannot read {}", f.display()), e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            Error::input(
                what(),
                format!(
                    "{} is not UTF-8 text (byte {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                ),
            )
        })?;
        parts.push(text);
    }
    let corpus = parts.join("\n");
    if corpus.trim().is_empty() {
        return Err(Error::input(what(), "the corpus is empty"));
    }
    Ok(corpus)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn DataSource>> {
    let p: TextParams = params.parse()?;
    check_val_fraction(params, p.val_fraction)?;
    let corpus = read_corpus(&p.path, &params.key_path("path"))?;
    let mut tctx = ctx.clone();
    tctx.corpus = Some(&corpus);
    let tok_path = params.key_path("tokenizer");
    let tokenizer = ctx
        .registry
        .tokenizers
        .build(&p.tokenizer.kind, &p.tokenizer.params_at(&tok_path), &tctx)?;
    let ids = tokenizer.encode(&corpus)?;
    let n_val = ((ids.len() as f64) * p.val_fraction).round() as usize;
    let split = ids.len() - n_val;
    let description = format!(
        "text {} ({} chars, {} tokens: {} train / {} val, vocab {})",
        p.path.display(),
        corpus.chars().count(),
        ids.len(),
        split,
        n_val,
        tokenizer.vocab_size()
    );
    Ok(Box::new(TokenStreams {
        train: ids[..split].to_vec(),
        val: ids[split..].to_vec(),
        tokenizer,
        description,
        prompts: None,
    }))
}

inventory::submit! {
    Factory::<dyn DataSource> {
        kind: "text",
        description: "a text file or directory, tokenized, with a deterministic train/val split",
        build, params: retort_core::registry::params_schema::<TextParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use retort_core::Registry;
    use retort_core::{Split, Tokenizer};

    fn build_at(path: &Path, val_fraction: f64) -> Result<Box<dyn DataSource>> {
        let mut reg = Registry::empty();
        for f in inventory::iter::<Factory<dyn Tokenizer>> {
            reg.tokenizers.register(f, "built-in")?;
        }
        let ctx = BuildContext::new(&reg, Device::Cpu, 0);
        let params = Params::new(
            "data",
            serde_json::json!({"path": path, "val_fraction": val_fraction})
                .as_object()
                .expect("o")
                .clone(),
        );
        build(&params, &ctx)
    }

    #[test]
    fn directory_files_are_joined_in_name_order_and_split_at_the_end() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("b.txt"), "bbbb").expect("w");
        std::fs::write(d.path().join("a.txt"), "aaaa").expect("w");
        std::fs::write(d.path().join(".hidden"), "zzzz").expect("w");
        let src = build_at(d.path(), 0.2).expect("build");
        let tok = src.tokenizer();
        // "aaaa\nbbbb": 9 tokens, 2 held out.
        assert_eq!(tok.decode(src.tokens(Split::Train)).expect("dec"), "aaaa\nbb");
        assert_eq!(tok.decode(src.tokens(Split::Val)).expect("dec"), "bb");
        assert_eq!(tok.vocab_size(), 3);
    }

    #[test]
    fn bad_inputs_name_the_key_path() {
        let d = tempfile::tempdir().expect("tmp");
        let err = build_at(&d.path().join("missing.txt"), 0.1).err().expect("missing");
        assert!(err.to_string().contains("data.path") && err.exit_code() == 2, "{err}");
        std::fs::write(d.path().join("bin"), [0xffu8, 0xfe, 0x00]).expect("w");
        let err = build_at(&d.path().join("bin"), 0.1).err().expect("binary");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        std::fs::write(d.path().join("t.txt"), "hello").expect("w");
        let err = build_at(&d.path().join("t.txt"), 0.9).err().expect("fraction");
        assert!(err.to_string().contains("data.val_fraction"), "{err}");
    }
}
