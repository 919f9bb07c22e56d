//! Where a llama checkpoint comes from: a Hugging Face directory or a GGUF file, told apart
//! by the file's magic; its architecture, its weights as dense tensors in Hugging Face layout
//! (for a student), and the tokenizer stored with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use retort_core::{Error, Result};

use super::checkpoint::load_safetensors;
use super::config::LlamaConfig;
use super::gguf;
use crate::formats::gguf::{is_gguf, GgufFile};
use crate::tokenizers::hf::HfTokenizer;

/// A checkpoint of any supported form: a Hugging Face directory or a GGUF file.
pub enum Source {
    /// A Hugging Face directory.
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

/// What to do about a checkpoint path that does not exist. retort reads local files only (it
/// runs offline); a Hugging Face repository id gets the command that fetches it.
pub fn missing_checkpoint_help(path: &Path) -> String {
    let text = path.to_string_lossy();
    let looks_like_repo = text.split('/').count() == 2
        && !text.starts_with('.')
        && !text.ends_with(".gguf")
        && text.split('/').all(|p| !p.is_empty());
    if looks_like_repo {
        let local = format!("models/{}", text.rsplit('/').next().unwrap_or(&text));
        format!(
            "`{text}` is not a local path; retort does not download models. Fetch the repository where \
             you have network access, e.g. `huggingface-cli download {text} --local-dir {local}` \
             (config.json, *.safetensors, tokenizer.json), copy it here and set the checkpoint to \"{local}\""
        )
    } else {
        format!(
            "{} does not exist; give a Hugging Face model directory (config.json + model.safetensors) or a              .gguf file (SmolLM2: scripts/fetch_smollm2.sh puts it in models/)",
            path.display()
        )
    }
}

impl Source {
    /// Classifies `path` (a `.gguf` file by its magic, else a directory), or an error for the
    /// config key `key_path`.
    pub fn of(path: &Path, key_path: &str) -> Result<Self> {
        if is_gguf(path) {
            Ok(Source::Gguf(path.to_path_buf()))
        } else if path.is_dir() {
            Ok(Source::HfDir(path.to_path_buf()))
        } else if !path.exists() {
            Err(Error::config(key_path, missing_checkpoint_help(path)))
        } else {
            Err(Error::config(
                key_path,
                format!(
                    "{} is neither a Hugging Face model directory nor a GGUF file",
                    path.display()
                ),
            ))
        }
    }

    /// The checkpoint's architecture.
    pub fn config(&self, key_path: &str) -> Result<LlamaConfig> {
        match self {
            Source::HfDir(d) => LlamaConfig::read_hf_dir(d, key_path),
            Source::Gguf(f) => gguf::read_config(&GgufFile::open(f)?),
        }
    }

    /// Every weight as a dense tensor in Hugging Face names and row order (GGUF weights are
    /// dequantized and their q/k rows un-permuted), with the architecture they imply (always
    /// Hugging Face RoPE).
    pub fn dense_weights(&self, device: &Device) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
        match self {
            Source::HfDir(d) => Ok((LlamaConfig::read_hf_dir(d, "checkpoint")?, load_safetensors(d, device)?)),
            Source::Gguf(f) => gguf::dense_weights(&mut GgufFile::open(f)?, device),
        }
    }

    /// The tokenizer stored with the checkpoint (`tokenizer.json` in the directory, or the
    /// GGUF metadata), if any.
    pub fn tokenizer(&self) -> Option<HfTokenizer> {
        match self {
            Source::HfDir(d) if d.join("tokenizer.json").is_file() => {
                HfTokenizer::from_json_file(&d.join("tokenizer.json")).ok()
            }
            Source::HfDir(_) => None,
            Source::Gguf(f) => HfTokenizer::from_path(f).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_checkpoint_says_what_to_fetch_and_where_to_put_it() {
        let err = Source::of(Path::new("HuggingFaceTB/SmolLM2-135M"), "teacher.checkpoint")
            .err()
            .expect("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("teacher.checkpoint")
                && msg.contains("huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir models/SmolLM2-135M"),
            "{msg}"
        );
        assert_eq!(err.exit_code(), 2);
        let err = Source::of(Path::new("models/nothing.gguf"), "teacher.checkpoint")
            .err()
            .expect("missing");
        assert!(
            err.to_string().contains("does not exist") && err.to_string().contains("fetch_smollm2"),
            "{err}"
        );
    }
}
