//! Tokenizer `hf`: a Hugging Face `tokenizers` tokenizer, read from a `tokenizer.json`, a model
//! directory holding one, or the metadata of a GGUF file (`tokenizer.ggml.*`, byte-level BPE).
//!
//! ```toml
//! tokenizer = { kind = "hf", path = "models/SmolLM2-135M-Instruct.Q4_1.gguf" }
//! ```
//!
//! Text is encoded without added special tokens (the data stream is one document); special
//! tokens written in the text (`<|im_start|>`) map to their ids. `bos`/`eos`/`pad` come from
//! the GGUF metadata, or from `config.json`/`generation_config.json` beside a `tokenizer.json`.

use std::path::{Path, PathBuf};

use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::PreTokenizerWrapper;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, Params, Result, Tokenizer};

use crate::formats::gguf::{is_gguf, GgufFile};

/// A `tokenizers` tokenizer with its special ids.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    identity: String,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    source: String,
}

fn identity_of(t: &tokenizers::Tokenizer) -> String {
    let mut vocab: Vec<(u32, String)> = t.get_vocab(true).into_iter().map(|(s, i)| (i, s)).collect();
    vocab.sort();
    let mut h = Sha256::new();
    for (i, s) in &vocab {
        h.update(i.to_le_bytes());
        h.update(s.as_bytes());
        h.update([0u8]);
    }
    let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("bpe:{}:{hex}", vocab.len())
}

impl HfTokenizer {
    fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        pad: Option<u32>,
        add_bos: bool,
        source: String,
    ) -> Self {
        HfTokenizer {
            identity: identity_of(&inner),
            inner,
            bos,
            eos,
            pad,
            add_bos,
            source,
        }
    }

    /// From a `tokenizer.json` file, a directory holding one, or a `.gguf` file.
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_json_file(&path.join("tokenizer.json"));
        }
        if is_gguf(path) {
            return Self::from_gguf(&GgufFile::open_as(path, format!("tokenizer {}", path.display()))?);
        }
        Self::from_json_file(path)
    }

    /// From a `tokenizer.json`; special ids from `config.json` / `generation_config.json` in the
    /// same directory, else from tokens named like `<|endoftext|>`, `<s>`, `</s>`.
    pub fn from_json_file(file: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(file).map_err(|e| {
            Error::input_failed(format!("tokenizer {}", file.display()), "cannot load tokenizer.json", e)
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut ids = (None, None, None);
        for name in ["generation_config.json", "config.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let id = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_u64().or_else(|| x.as_array()?.first()?.as_u64()))
                    .map(|x| x as u32)
            };
            ids = (
                ids.0.or(id("bos_token_id")),
                ids.1.or(id("eos_token_id")),
                ids.2.or(id("pad_token_id")),
            );
        }
        let by_name = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = ids
            .0
            .or_else(|| by_name(&["<s>", "<|begin_of_text|>", "<|endoftext|>"]));
        let eos = ids.1.or_else(|| by_name(&["</s>", "<|end_of_text|>", "<|endoftext|>"]));
        Ok(Self::new(inner, bos, eos, ids.2, false, file.display().to_string()))
    }

    /// From GGUF metadata (`tokenizer.ggml.model = "gpt2"`: byte-level BPE).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let source = gguf.path().display().to_string();
        let what = || format!("tokenizer of GGUF {source}");
        let mut inner =
            tokenizers::Tokenizer::from_gguf(&gguf.content).map_err(|e| Error::input_failed(what(), "unusable", e))?;
        let id = |keys: &[&str]| keys.iter().find_map(|k| gguf.meta_usize(k)).map(|v| v as u32);
        let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        // candle's builder knows qwen2/llama3; for the GPT-2-regex family set what their
        // tokenizer.json says (no prefix space; SmolLM also splits every digit).
        let byte_level = ByteLevel::new(false, true, true);
        match pre {
            "qwen2" | "llama3" | "smaug-bpe" | "lfm2" => {}
            "smollm" | "starcoder" | "refact" => {
                let seq = Sequence::new(vec![Digits::new(true).into(), byte_level.into()]);
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::from(seq)));
            }
            other => {
                if other != "gpt2" && other != "default" {
                    tracing::warn!("GGUF pre-tokenizer `{other}` is not known; using GPT-2's byte-level split");
                }
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::from(byte_level)));
            }
        }
        let add_bos = gguf.meta_bool("tokenizer.ggml.add_bos_token") == Some(true);
        Ok(Self::new(
            inner,
            id(&["tokenizer.ggml.bos_token_id"]),
            id(&["tokenizer.ggml.eos_token_id"]),
            id(&["tokenizer.ggml.padding_token_id", "tokenizer.ggml.pad_token_id"]),
            add_bos,
            format!("GGUF {source}"),
        ))
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Where it was read from.
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl Tokenizer for HfTokenizer {
    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::input_failed("text", "cannot tokenize", e))?;
        Ok(enc.get_ids().to_vec())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::failed("cannot decode token ids", e))
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
    fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    fn eos_id(&self) -> Option<u32> {
        self.eos
    }
    fn pad_id(&self) -> Option<u32> {
        self.pad.or(self.eos)
    }
    fn add_bos(&self) -> bool {
        self.add_bos
    }
    fn hf_json(&self) -> Option<String> {
        self.inner.to_string(true).ok()
    }
}

/// Params of `hf`.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HfParams {
    /// A `tokenizer.json`, a Hugging Face model directory, or a `.gguf` file.
    pub path: PathBuf,
}

fn build(params: &Params, _ctx: &BuildContext) -> Result<Box<dyn Tokenizer>> {
    let p: HfParams = params.parse()?;
    if !p.path.exists() {
        return Err(params.error("path", format!("{} does not exist", p.path.display())));
    }
    Ok(Box::new(HfTokenizer::from_path(&p.path)?))
}

inventory::submit! {
    Factory::<dyn Tokenizer> {
        kind: "hf",
        description: "Hugging Face tokenizer from a tokenizer.json, a model directory or GGUF metadata (byte-level BPE)",
        build, params: retort_core::registry::params_schema::<HfParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf;
    use crate::testing::tiny_bpe_metadata;

    #[test]
    fn tokenizer_from_gguf_metadata_is_byte_level_bpe_with_specials() {
        // A GGUF file with the tokenizer's metadata and no tensors: the tokenizer reads nothing else.
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tok.gguf");
        gguf::write(&path, &tiny_bpe_metadata(), &[]).expect("save");
        let t = HfTokenizer::from_path(&path).expect("tokenizer");
        assert_eq!(t.vocab_size(), 262);
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.pad_id(), t.add_bos()),
            (Some(1), Some(2), Some(2), false)
        );
        let ids = t.encode("<|im_start|> the 42").expect("enc");
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&261), "`Ġthe` is one token: {ids:?}");
        // SmolLM's pre-tokenizer splits every digit: "4" and "2" are separate byte tokens.
        assert_eq!(t.decode(&ids).expect("dec"), "<|im_start|> the 42");
        assert_eq!(
            t.decode(&t.encode("hello there").expect("e")).expect("d"),
            "hello there"
        );
        // Written as tokenizer.json and read back, the identity is the same.
        let json = dir.path().join("tokenizer.json");
        std::fs::write(&json, t.hf_json().expect("json")).expect("write");
        let back = HfTokenizer::from_path(&json).expect("back");
        assert_eq!(back.identity(), t.identity());
        assert_eq!(back.encode("the 42").expect("e"), t.encode("the 42").expect("e"));
    }

    proptest::proptest! {
        // Half the cases: building a byte-level BPE takes a few milliseconds.
        #![proptest_config(proptest::prelude::ProptestConfig { cases: crate::fuzz::CASES / 2, ..crate::fuzz::config() })]

        /// The tokenizer of a damaged GGUF file is refused naming the file, or it works.
        #[test]
        fn damaged_gguf_tokenizers_are_refused_naming_the_file(edits in crate::fuzz::edits(3)) {
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("tok.gguf");
            gguf::write(&path, &tiny_bpe_metadata(), &[]).expect("save");
            let good = std::fs::read(&path).expect("read");
            std::fs::write(&path, crate::fuzz::apply(&good, &edits)).expect("write");
            let file = path.display().to_string();
            if let Some(t) = crate::fuzz::user_error_naming(HfTokenizer::from_path(&path), &file)? {
                let _ = t.encode("<|im_start|> the 42").and_then(|ids| t.decode(&ids));
            }
        }
    }
}
