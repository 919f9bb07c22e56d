//! Data kind `jsonl`: documents from JSON Lines files (one object a line, the text in `field`),
//! packed into one token stream with an end-of-document token after each document (the
//! tokenizer's eos; for a tokenizer without one, the encoding of `separator`). The last
//! `val_fraction` of the documents validate, so no document straddles the split.
//!
//! ```toml
//! [data]
//! kind = "jsonl"
//! path = "data/corpus.jsonl"     # or a directory: every *.jsonl in it, sorted by name
//! field = "text"
//! tokenizer = { kind = "hf", path = "models/SmolLM2-135M-Instruct.Q4_1.gguf" }
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use retort_core::config::ComponentSpec;
use retort_core::registry::Factory;

use super::streams::{check_val_fraction, TokenStreams};
use retort_core::{BuildContext, DataSource, Error, Params, Result, Tokenizer};

/// Params of `jsonl`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonlParams {
    /// A `.jsonl` file, or a directory whose `*.jsonl` files are read in name order. Required.
    pub path: PathBuf,
    /// The string field holding a document's text. Default `"text"`.
    #[serde(default = "default_field")]
    pub field: String,
    /// Fraction of the documents (the last ones) held out for validation, in `(0, 0.5]`.
    /// Default 0.1.
    #[serde(default = "default_val")]
    pub val_fraction: f64,
    /// Tokenizer. Default `{ kind = "char" }` (learned from the documents).
    #[serde(default = "default_tokenizer")]
    pub tokenizer: ComponentSpec,
    /// Text placed after each document when the tokenizer has no eos token.
    pub separator: Option<String>,
}

fn default_field() -> String {
    "text".into()
}
fn default_val() -> f64 {
    0.1
}
fn default_tokenizer() -> ComponentSpec {
    ComponentSpec::new("char")
}

fn files(path: &Path, key: &str) -> Result<Vec<PathBuf>> {
    let what = || format!("{key} = \"{}\"", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::input_failed(what(), "cannot read", e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::input_failed(what(), "cannot list directory", e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::input(what(), "directory holds no .jsonl files"));
    }
    Ok(v)
}

/// Every document's text, in order; a bad line is an error naming `file:line`.
pub fn read_documents(paths: &[PathBuf], field: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for p in paths {
        let f = std::fs::File::open(p).map_err(|e| Error::io("opening JSONL file", p, e))?;
        for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
            let at = || format!("{}:{}", p.display(), i + 1);
            let line = line.map_err(|e| Error::input_failed(at(), "unreadable", e))?;
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| Error::input_failed(at(), "not a JSON object", e))?;
            let text = v.get(field).and_then(|t| t.as_str()).ok_or_else(|| {
                Error::input(
                    at(),
                    format!("has no string field `{field}` (set data.field to the field holding the text)"),
                )
            })?;
            docs.push(text.to_string());
        }
    }
    Ok(docs)
}

/// `docs` tokenized and packed, each followed by `end`.
fn pack(tokenizer: &dyn Tokenizer, docs: &[String], end: &[u32]) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for d in docs {
        out.extend(tokenizer.encode(d)?);
        out.extend_from_slice(end);
    }
    Ok(out)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn DataSource>> {
    let p: JsonlParams = params.parse()?;
    check_val_fraction(params, p.val_fraction)?;
    let paths = files(&p.path, &params.key_path("path"))?;
    let docs = read_documents(&paths, &p.field)?;
    if docs.len() < 2 {
        return Err(params.error(
            "path",
            format!(
                "{} document(s); at least 2 are needed to hold some out for validation",
                docs.len()
            ),
        ));
    }
    let mut corpus = docs.join("\n");
    if let Some(s) = &p.separator {
        corpus.push_str(s);
    }
    let mut tctx = ctx.clone();
    tctx.corpus = Some(&corpus);
    let tokenizer = ctx.registry.tokenizers.build(
        &p.tokenizer.kind,
        &p.tokenizer.params_at(&params.key_path("tokenizer")),
        &tctx,
    )?;
    let end: Vec<u32> = match (tokenizer.eos_id(), &p.separator) {
        (_, Some(s)) => tokenizer.encode(s)?,
        (Some(eos), None) => vec![eos],
        (None, None) => {
            return Err(params.error(
                "separator",
                format!(
                    "the tokenizer ({}) has no end-of-sequence token: give a `separator` to put between documents",
                    tokenizer.identity()
                ),
            ))
        }
    };
    let n_val = ((docs.len() as f64 * p.val_fraction).round() as usize).clamp(1, docs.len() - 1);
    let split = docs.len() - n_val;
    let train = pack(tokenizer.as_ref(), &docs[..split], &end)?;
    let val = pack(tokenizer.as_ref(), &docs[split..], &end)?;
    let description = format!(
        "jsonl {} ({} documents: {split} train / {n_val} val; {} + {} tokens, field `{}`, vocab {})",
        p.path.display(),
        docs.len(),
        train.len(),
        val.len(),
        p.field,
        tokenizer.vocab_size()
    );
    Ok(Box::new(TokenStreams {
        tokenizer,
        train,
        val,
        description,
    }))
}

inventory::submit! {
    Factory::<dyn DataSource> {
        kind: "jsonl",
        description: "documents from JSON Lines (a text field), packed with an end-of-document token",
        build, params: retort_core::registry::params_schema::<JsonlParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_core::Registry;
    use retort_core::Split;

    fn source(dir: &Path, params: serde_json::Value) -> Result<Box<dyn DataSource>> {
        let registry = Registry::from_inventory().expect("registry");
        let ctx = BuildContext::new(&registry, candle_core::Device::Cpu, 1);
        let mut p = params;
        p["path"] = serde_json::json!(dir.display().to_string());
        let map = p.as_object().cloned().expect("object");
        build(&Params::new("data", map), &ctx)
    }

    #[test]
    fn documents_are_packed_with_the_separator_and_split_by_document() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(
            d.path().join("a.jsonl"),
            "{\"text\": \"ab\", \"id\": 1}\n\n{\"text\": \"ba\"}\n",
        )
        .expect("w");
        std::fs::write(d.path().join("b.jsonl"), "{\"text\": \"cab\"}\n").expect("w");
        std::fs::write(d.path().join("notes.txt"), "ignored").expect("w");
        let src = source(d.path(), serde_json::json!({"separator": "|", "val_fraction": 0.34})).expect("build");
        let tok = src.tokenizer();
        assert_eq!(tok.decode(src.tokens(Split::Train)).expect("dec"), "ab|ba|");
        assert_eq!(tok.decode(src.tokens(Split::Val)).expect("dec"), "cab|");
    }

    #[test]
    fn bad_lines_name_file_and_line_and_a_missing_eos_is_explained() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("c.jsonl");
        std::fs::write(&f, "{\"text\": \"a\"}\n{\"body\": \"b\"}\n").expect("w");
        let err = source(&f, serde_json::json!({"separator": "|"}))
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("c.jsonl:2") && err.to_string().contains("`text`"),
            "{err}"
        );
        std::fs::write(&f, "{\"text\": \"a\"}\nnot json\n").expect("w");
        let err = source(&f, serde_json::json!({"separator": "|"}))
            .err()
            .expect("refused");
        assert!(
            err.to_string().contains("c.jsonl:2") && err.to_string().contains("JSON"),
            "{err}"
        );
        std::fs::write(&f, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n").expect("w");
        let err = source(&f, serde_json::json!({})).err().expect("refused");
        assert!(
            err.to_string().contains("data.separator") && err.to_string().contains("end-of-sequence"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
    }
}
