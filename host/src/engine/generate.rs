//! `retort generate`: sample a continuation of a prompt from a model file or directory — a GGUF
//! file, a Hugging Face directory (llama family or GPT-2), or a retort export (which is one).
//! The tokenizer comes with the model (GGUF metadata, or `tokenizer.json` in the directory).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use retort_core::{Batch, Error, Params, Registry, Result, TapSet};
use retort_plugins::models::generate::{generate, Sampling};

/// Options of `retort generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// GGUF file or model directory.
    pub model: PathBuf,
    /// Prompt text.
    pub prompt: String,
    /// How to sample.
    pub sampling: Sampling,
    /// Device (`cpu`, `cuda`, ...).
    pub device: String,
    /// Longest window fed to the model (default: the model's context, at most 2048).
    pub context: Option<usize>,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The decoded continuation (without the prompt).
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub tokens: usize,
    /// Wall time of the generation in seconds (model loading excluded).
    pub seconds: f64,
    /// The model's one-line description.
    pub model: String,
}

/// Which teacher kind reads `path`: `llama` for GGUF files and llama-family directories,
/// `transformer` for GPT-2 directories.
fn kind_of(path: &Path) -> Result<&'static str> {
    let what = || format!("--model {}", path.display());
    if retort_plugins::tokenizers::hf::is_gguf(path) {
        return Ok("llama");
    }
    if !path.is_dir() {
        return Err(Error::input(what(), "is neither a GGUF file nor a model directory"));
    }
    let cfg = path.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .map_err(|e| Error::input(what(), format!("cannot read {}: {e}", cfg.display())))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(what(), format!("{} is not JSON: {e}", cfg.display())))?;
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
) -> Result<(Box<dyn retort_core::Teacher>, Box<dyn retort_core::Tokenizer>)> {
    let kind = kind_of(path)?;
    let ctx = retort_core::BuildContext::new(registry, device.clone(), 0);
    let tokenizer = load_tokenizer(registry, path, &ctx)?;
    let mut mp = serde_json::Map::new();
    mp.insert("checkpoint".into(), path.display().to_string().into());
    if kind == "llama" {
        // RoPE tables only as long as needed.
        mp.insert("context".into(), context.unwrap_or(2048).into());
    }
    let model = registry.teachers.build(kind, &Params::new("model", mp), &ctx)?;
    Ok((model, tokenizer))
}

/// Llama models decode incrementally with a key/value cache.
fn generate_llama(registry: &Registry, opts: &GenerateOptions, device: &candle_core::Device) -> Result<Generated> {
    let ctx = retort_core::BuildContext::new(registry, device.clone(), 0);
    let tokenizer = load_tokenizer(registry, &opts.model, &ctx)?;
    let mut mp = serde_json::Map::new();
    mp.insert("checkpoint".into(), opts.model.display().to_string().into());
    mp.insert("context".into(), opts.context.unwrap_or(2048).into());
    let model = retort_plugins::teachers::llama::load_frozen(&Params::new("model", mp), &ctx)?;
    let prompt = prompt_ids(tokenizer.as_ref(), &opts.prompt)?;
    let t0 = Instant::now();
    let out =
        retort_plugins::models::generate::generate_cached(&model, &prompt, tokenizer.eos_id(), &opts.sampling, device)?;
    Ok(Generated {
        text: tokenizer.decode(&out)?,
        prompt_tokens: prompt.len(),
        tokens: out.len(),
        seconds: t0.elapsed().as_secs_f64(),
        model: format!("{} (KV cache)", retort_core::Model::describe(&model)),
    })
}

fn prompt_ids(tokenizer: &dyn retort_core::Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut prompt = Vec::new();
    if tokenizer.add_bos() {
        prompt.extend(tokenizer.bos_id());
    }
    prompt.extend(tokenizer.encode(text)?);
    Ok(prompt)
}

fn load_tokenizer(
    registry: &Registry,
    path: &Path,
    ctx: &retort_core::BuildContext,
) -> Result<Box<dyn retort_core::Tokenizer>> {
    let tok_params = Params::new(
        "tokenizer",
        serde_json::json!({"path": path})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    registry.tokenizers.build("hf", &tok_params, ctx).map_err(|e| {
        Error::input(
            format!("--model {}", path.display()),
            format!("no usable tokenizer with the model (GGUF metadata or tokenizer.json): {e}"),
        )
    })
}

/// Loads the model and its tokenizer and samples a continuation of the prompt.
pub fn run_generate(registry: &Registry, opts: &GenerateOptions) -> Result<Generated> {
    let device = crate::assemble::device::parse_device(&opts.device)?;
    if kind_of(&opts.model)? == "llama" {
        return generate_llama(registry, opts, &device);
    }
    let (model, tokenizer) = load_model_file(registry, &opts.model, &device, opts.context)?;
    let prompt = prompt_ids(tokenizer.as_ref(), &opts.prompt)?;
    let context = opts.context.unwrap_or(model.context_len()).min(model.context_len());
    let forward = |ids: &Tensor| -> Result<Tensor> {
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids.clone(),
            mask: None,
            source: None,
        };
        Ok(model.forward(&batch, &TapSet::none())?.logits)
    };
    let t0 = Instant::now();
    let out = generate(&forward, &prompt, context, tokenizer.eos_id(), &opts.sampling, &device)?;
    Ok(Generated {
        text: tokenizer.decode(&out)?,
        prompt_tokens: prompt.len(),
        tokens: out.len(),
        seconds: t0.elapsed().as_secs_f64(),
        model: model.describe(),
    })
}
