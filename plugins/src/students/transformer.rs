//! Student kind `transformer`: a GPT-2-style model, freshly initialised from the run seed or
//! loaded from `checkpoint` (a Hugging Face directory).
//!
//! ```toml
//! [student]
//! kind = "transformer"
//! n_layer = 2
//! n_embd = 64
//! n_head = 4
//! context = 64
//! ```

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Student};

use crate::models::transformer::{Transformer, TransformerConfig, TransformerParams};

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Student>> {
    let (cfg, checkpoint) = TransformerConfig::resolve(params, ctx.vocab_size)?;
    if matches!(cfg.dtype, candle_core::DType::BF16 | candle_core::DType::F16) {
        return Err(params.error(
            "dtype",
            "the `transformer` student trains f32 (or f64) master weights and computes in them; mixed precision \
             (bf16 compute) is built for the `llama` student on CUDA; bf16/f16 is for frozen teachers \
             (`teacher.precision`)",
        ));
    }
    Ok(Box::new(match checkpoint {
        Some(dir) => Transformer::load(cfg, &dir, &ctx.device)?,
        None => Transformer::init(cfg, ctx.seed, &ctx.device)?,
    }))
}

inventory::submit! {
    Factory::<dyn Student> {
        kind: "transformer",
        description: "GPT-2-style decoder (Hugging Face GPT2LMHeadModel layout), fresh or from a checkpoint",
        build, params: retort_core::registry::params_schema::<TransformerParams> }
}
