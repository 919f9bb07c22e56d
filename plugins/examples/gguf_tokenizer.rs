//! Writes the tokenizer stored in a GGUF file's metadata as a Hugging Face `tokenizer.json`
//! (what `scripts/gpu_pack.sh` sends to a GPU machine, where a SmolLM2-shaped model is built
//! without the 94 MB checkpoint).
//!
//! `cargo run --release -p retort-plugins --example gguf_tokenizer -- MODEL.gguf OUT/tokenizer.json`

use std::path::PathBuf;

use anyhow::{bail, Context};
use retort_plugins::tokenizers::hf::HfTokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [gguf, out] = args.as_slice() else {
        bail!("usage: gguf_tokenizer MODEL.gguf OUT/tokenizer.json")
    };
    let tokenizer = HfTokenizer::from_path(gguf).with_context(|| format!("reading {}", gguf.display()))?;
    tokenizer
        .inner()
        .save(out, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    println!(
        "wrote {} ({} tokens)",
        out.display(),
        tokenizer.inner().get_vocab_size(true)
    );
    Ok(())
}
