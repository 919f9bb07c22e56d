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

use candle_core::DType;
use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Student};

use super::check_precision;
use crate::models::transformer::{Transformer, TransformerConfig, TransformerParams};

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Student>> {
    let (mut cfg, checkpoint) = TransformerConfig::resolve(params, ctx.vocab_size)?;
    // Mixed precision: `dtype = "bf16"` keeps f32 master weights and computes in bf16.
    let compute = cfg.dtype;
    if matches!(compute, DType::BF16 | DType::F16) {
        check_precision(compute, false, params, &ctx.device)?;
        cfg.dtype = DType::F32;
    }
    let model = match checkpoint {
        Some(dir) => Transformer::load(cfg, &dir, &ctx.device)?,
        None => Transformer::init(cfg, ctx.seed, &ctx.device)?,
    };
    Ok(Box::new(model.computing_in(compute)))
}

inventory::submit! {
    Factory::<dyn Student> {
        kind: "transformer",
        description: "GPT-2-style decoder (Hugging Face GPT2LMHeadModel layout), fresh or from a checkpoint",
        build, params: retort_core::registry::params_schema::<TransformerParams> }
}
