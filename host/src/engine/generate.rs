//! `retort generate`: sample a continuation of a prompt from a model file or directory — a GGUF
//! file, a Hugging Face directory (llama family or GPT-2), or a retort export (which is one).
//! The tokenizer comes with the model (GGUF metadata, or `tokenizer.json` in the directory).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;

use retort_core::{Batch, Error, Params, Registry, Result, TapSet};

use crate::assemble::model_file::{check_vocab, kind_of, load_model_file, load_tokenizer};
use retort_plugins::models::generate::{sample_batch, Decoder, LlamaDecoder, Sampling, WindowDecoder};

/// Options of `retort generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateOptions {
    /// GGUF file or model directory (with its tokenizer: GGUF metadata or tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens summing to P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the K most likely tokens only (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Continuations of the prompt sampled at once, in one batch (sample `i` draws from stream
    /// `i` of the seed, so it does not depend on the batch size).
    #[arg(long, default_value_t = 1, value_parser = crate::engine::flags::at_least_one)]
    pub batch: usize,
    /// Seed of the sampling stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Longest window fed to the model (default: its context, at most 2048 for llama models).
    #[arg(long)]
    pub context: Option<usize>,
    /// Do not stop at the end-of-sequence token: every sample gets --max-tokens tokens (for
    /// measuring throughput).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Dequantize a GGUF llama's weights to f32 at load (faster matmuls on CPUs without fast
    /// quantized kernels, 4-8x the memory).
    #[arg(long)]
    pub dequantize: bool,
}

impl GenerateOptions {
    /// The id samples stop at: the tokenizer's end of sequence, unless `--ignore-eos`.
    fn eos(&self, tokenizer: &dyn retort_core::Tokenizer) -> Option<u32> {
        tokenizer.eos_id().filter(|_| !self.ignore_eos)
    }

    /// An input error for `--context 0`.
    fn check_context(&self) -> Result<()> {
        match self.context {
            Some(0) => Err(Error::input(
                "--context",
                "expected an integer >= 1 (tokens fed to the model at once; more than the model's context are cut \
                 to it), got 0",
            )),
            _ => Ok(()),
        }
    }

    /// How to sample; an input error for a temperature that is not a number >= 0.
    fn sampling(&self) -> Result<Sampling> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::input(
                "--temperature",
                format!("expected a number >= 0, got {}", self.temperature),
            ));
        }
        Ok(Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        })
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The decoded continuations (without the prompt), one per sample.
    pub texts: Vec<String>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens, all samples together.
    pub tokens: usize,
    /// Wall time of the generation in seconds (model loading excluded).
    pub seconds: f64,
    /// The model's one-line description.
    pub model: String,
}

/// Llama models decode incrementally with a key/value cache.
fn generate_llama(
    registry: &Registry,
    opts: &GenerateOptions,
    sampling: &Sampling,
    device: &candle_core::Device,
) -> Result<Generated> {
    let ctx = retort_core::BuildContext::new(registry, device.clone(), 0);
    let tokenizer = load_tokenizer(registry, &opts.model, &ctx)?;
    let mut mp = serde_json::Map::new();
    mp.insert("checkpoint".into(), opts.model.display().to_string().into());
    mp.insert("context".into(), opts.context.unwrap_or(2048).into());
    if opts.dequantize {
        mp.insert("dequantize".into(), true.into());
    }
    let model = retort_plugins::teachers::llama::load_frozen(&Params::new("model", mp), &ctx)?;
    check_vocab(
        &opts.model,
        retort_core::Model::vocab_size(&model),
        tokenizer.vocab_size(),
    )?;
    let prompt = prompt_ids(tokenizer.as_ref(), &opts.prompt)?;
    let t0 = Instant::now();
    let outs = sample(
        &mut LlamaDecoder::new(&model),
        opts,
        &prompt,
        opts.eos(tokenizer.as_ref()),
        sampling,
        device,
    )?;
    finish(
        tokenizer.as_ref(),
        &outs,
        prompt.len(),
        t0,
        format!("{} (KV cache)", retort_core::Model::describe(&model)),
    )
}

/// `opts.batch` continuations of `prompt`.
fn sample(
    decoder: &mut dyn Decoder,
    opts: &GenerateOptions,
    prompt: &[u32],
    eos: Option<u32>,
    sampling: &Sampling,
    device: &candle_core::Device,
) -> Result<Vec<Vec<u32>>> {
    sample_batch(decoder, &vec![prompt.to_vec(); opts.batch], eos, sampling, device)
}

/// The decoded samples and their counts.
fn finish(
    tokenizer: &dyn retort_core::Tokenizer,
    outs: &[Vec<u32>],
    prompt_tokens: usize,
    t0: Instant,
    model: String,
) -> Result<Generated> {
    Ok(Generated {
        texts: outs.iter().map(|o| tokenizer.decode(o)).collect::<Result<_>>()?,
        prompt_tokens,
        tokens: outs.iter().map(Vec::len).sum(),
        seconds: t0.elapsed().as_secs_f64(),
        model,
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

/// Loads the model and its tokenizer and samples a continuation of the prompt.
pub fn run_generate(registry: &Registry, opts: &GenerateOptions) -> Result<Generated> {
    // On the pool's own threads, so that each kernel splits its loop in place instead of
    // waking the pool and sleeping (see `pool`).
    super::pool::on_pool(|| generate_on_pool(registry, opts))
}

fn generate_on_pool(registry: &Registry, opts: &GenerateOptions) -> Result<Generated> {
    opts.check_context()?;
    let sampling = opts.sampling()?;
    let device = crate::assemble::device::parse_device(&opts.device)?;
    if kind_of(&opts.model)? == "llama" {
        return generate_llama(registry, opts, &sampling, &device);
    }
    if opts.dequantize {
        return Err(Error::input(
            "--dequantize",
            format!("applies to GGUF llama models; {} is not one", opts.model.display()),
        ));
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
    let mut window = WindowDecoder::new(&forward, context);
    // The model's own cache, unless --context asks for a shorter window than the model's.
    let mut own = model.decoder().filter(|_| context == model.context_len());
    let decoder: &mut dyn Decoder = match own.as_mut() {
        Some(d) => d.as_mut(),
        None => &mut window,
    };
    let outs = sample(decoder, opts, &prompt, opts.eos(tokenizer.as_ref()), &sampling, &device)?;
    finish(tokenizer.as_ref(), &outs, prompt.len(), t0, model.describe())
}
