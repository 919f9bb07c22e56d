//! Data kind `jsonl`: documents from JSON Lines files (one object a line, the text in `field`),
//! packed into one token stream with an end-of-document token after each document (the
//! tokenizer's eos; for a tokenizer without one, the encoding of `separator`). The last
//! `val_fraction` of the documents validate, so no document straddles the split.
//!
//! With `prompt_field`, each record also holds a prompt: the document is the prompt followed by
//! the text (just the prompt when `field` names the prompt field too), and the prompts, tokenized
//! on their own, are what on-policy steps and the generation evaluation continue
//! ([`DataSource::prompts`]) instead of the starts of windows.
//!
//! ```toml
//! [data]
//! kind = "jsonl"
//! path = "data/corpus.jsonl"     # or a directory: every *.jsonl in it, sorted by name
//! field = "text"
//! tokenizer = { kind = "hf", path = "models/SmolLM2-135M-Instruct.Q4_1.gguf" }
//! prompt_field = "prompt"        # optional
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
    /// The string field holding each record's prompt (see the module docs). Default: none
    /// (prompts are cut from the start of training windows).
    pub prompt_field: Option<String>,
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

/// One JSON record: its text, and its prompt when a prompt field is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The `field` string.
    pub text: String,
    /// The `prompt_field` string.
    pub prompt: Option<String>,
}

impl Record {
    /// The document packed into the token stream: the prompt then the text (the prompt alone
    /// when both come from one field).
    fn document(&self, same_field: bool) -> String {
        match &self.prompt {
            Some(p) if !same_field => format!("{p}{}", self.text),
            _ => self.text.clone(),
        }
    }
}

/// Every record's `field` (and `prompt_field`), in order; a bad line is an error naming
/// `file:line` and the missing field.
pub fn read_records(paths: &[PathBuf], field: &str, prompt_field: Option<&str>) -> Result<Vec<Record>> {
    let mut records = Vec::new();
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
            let string = |name: &str, key: &str| -> Result<String> {
                v.get(name).and_then(|t| t.as_str()).map(str::to_string).ok_or_else(|| {
                    Error::input(
                        at(),
                        format!("has no string field `{name}` (set data.{key} to the field holding it)"),
                    )
                })
            };
            records.push(Record {
                text: string(field, "field")?,
                prompt: prompt_field.map(|f| string(f, "prompt_field")).transpose()?,
            });
        }
    }
    Ok(records)
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
    let records = read_records(&paths, &p.field, p.prompt_field.as_deref())?;
    let same_field = p.prompt_field.as_deref() == Some(p.field.as_str());
    let docs: Vec<String> = records.iter().map(|r| r.document(same_field)).collect();
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
    let prompts = match &p.prompt_field {
        Some(_) => Some((
            prompts_of(tokenizer.as_ref(), &records[..split])?,
            prompts_of(tokenizer.as_ref(), &records[split..])?,
        )),
        None => None,
    };
    let description = format!(
        "jsonl {} ({} documents: {split} train / {n_val} val; {} + {} tokens, field `{}`{}, vocab {})",
        p.path.display(),
        docs.len(),
        train.len(),
        val.len(),
        p.field,
        p.prompt_field
            .as_ref()
            .map(|f| format!(", prompts from `{f}`"))
            .unwrap_or_default(),
        tokenizer.vocab_size()
    );
    Ok(Box::new(TokenStreams {
        tokenizer,
        train,
        val,
        description,
        prompts,
    }))
}

/// The prompts of `records`, tokenized on their own (no special tokens).
fn prompts_of(tokenizer: &dyn Tokenizer, records: &[Record]) -> Result<Vec<Vec<u32>>> {
    records
        .iter()
        .filter_map(|r| r.prompt.as_deref())
        .map(|p| tokenizer.encode(p))
        .collect()
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
    fn a_prompt_field_prefixes_each_document_and_gives_the_prompts_of_each_split() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("p.jsonl");
        let lines = [
            r#"{"prompt": "ab", "text": "c"}"#,
            r#"{"prompt": "b", "text": "ca"}"#,
            r#"{"prompt": "cc", "text": "a"}"#,
        ];
        std::fs::write(&f, lines.join("\n")).expect("w");
        let params = serde_json::json!({"separator": "|", "val_fraction": 0.34, "prompt_field": "prompt"});
        let src = source(&f, params).expect("build");
        let tok = src.tokenizer();
        let text = |ids: &[u32]| tok.decode(ids).expect("dec");
        assert_eq!(text(src.tokens(Split::Train)), "abc|bca|");
        assert_eq!(text(src.tokens(Split::Val)), "cca|");
        let train: Vec<String> = src
            .prompts(Split::Train)
            .expect("prompts")
            .iter()
            .map(|p| text(p))
            .collect();
        assert_eq!(train, ["ab", "b"]);
        let val: Vec<String> = src
            .prompts(Split::Val)
            .expect("prompts")
            .iter()
            .map(|p| text(p))
            .collect();
        assert_eq!(val, ["cc"]);
        let same =
            serde_json::json!({"separator": "|", "val_fraction": 0.34, "field": "prompt", "prompt_field": "prompt"});
        let src = source(&f, same).expect("build");
        assert_eq!(src.tokenizer().decode(src.tokens(Split::Train)).expect("dec"), "ab|b|");
        let plain = source(&f, serde_json::json!({"separator": "|"})).expect("build");
        assert!(plain.prompts(Split::Train).is_none());
        std::fs::write(&f, format!("{}\n{{\"text\": \"x\"}}\n", lines[0])).expect("w");
        let err = source(&f, serde_json::json!({"separator": "|", "prompt_field": "prompt"}))
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("p.jsonl:2") && msg.contains("`prompt`") && msg.contains("data.prompt_field"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2);
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
