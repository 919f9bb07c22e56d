//! Teacher kind `llama`: a frozen llama-family model from `checkpoint`, a Hugging Face directory
//! (`config.json` + safetensors, sharded or not) or a GGUF file (quantized weights stay
//! quantized: Q4_0/Q4_1/Q8_0 through `kernels::cpu::quant` on the CPU, other formats and GPUs
//! through candle's `QMatMul`).
//!
//! Without a `checkpoint`, the host first trains a `llama` student with these params (budget
//! in `[teacher.pretrain]`), saves it, and loads it through this factory.
//!
//! ```toml
//! [teacher]
//! kind = "llama"
//! checkpoint = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! context = 512     # optional: shorter RoPE tables than the checkpoint's 8192
//! dequantize = true # optional: f32 weights (~10% faster batched forwards on CPU, ~5x the memory)
//! ```

use retort_core::registry::Factory;
use retort_core::{BuildContext, FrozenTeacher, Params, Result, Teacher, Tokenizer};

use crate::formats::gguf::GgufFile;
use crate::models::llama::checkpoint::load_hf;
use crate::models::llama::gguf;
use crate::models::llama::{Llama, LlamaConfig, LlamaParams, Source};

/// Loads the frozen model `params` describe.
pub fn load_frozen(params: &Params, ctx: &BuildContext) -> Result<Llama> {
    let p: LlamaParams = params.parse()?;
    if p.init.is_some() {
        return Err(params.error("init", "only a student can be initialised from a teacher"));
    }
    let path = p.checkpoint.clone().ok_or_else(|| {
        params.error("checkpoint", "a llama teacher needs a checkpoint (a Hugging Face directory or a .gguf file), or let the pipeline pretrain it")
    })?;
    let key = params.key_path("checkpoint");
    let src = Source::of(&path, &key)?;
    if p.dequantize.is_some() && !matches!(src, Source::Gguf(_)) {
        return Err(params.error("dequantize", "applies to GGUF checkpoints only"));
    }
    let ck = src.config(&key)?;
    let cfg = LlamaConfig::resolve(&p, params, Some(&ck), ctx.vocab_size)?;
    let model = match &src {
        Source::HfDir(dir) => load_hf(cfg, dir, false, &ctx.device)?,
        Source::Gguf(f) => gguf::load(&mut GgufFile::open(f)?, cfg, p.dequantize.unwrap_or(false), &ctx.device)?,
    };
    Ok(model
        .frozen()
        .with_tokenizer_identity(src.tokenizer().map(|t| t.identity())))
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Teacher>> {
    Ok(Box::new(FrozenTeacher(Box::new(load_frozen(params, ctx)?))))
}

inventory::submit! {
    Factory::<dyn Teacher> {
        kind: "llama",
        description: "frozen llama-family model from a Hugging Face directory or a GGUF file (quantized matmuls), pretrained by the pipeline if none",
        build, params: retort_core::registry::params_schema::<LlamaParams> }
}
