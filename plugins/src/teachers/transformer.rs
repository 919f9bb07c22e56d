//! Teacher kind `transformer`: a frozen GPT-2-style model loaded from `checkpoint`.
//!
//! Without a `checkpoint`, the host first trains a `transformer` student with these params on
//! the run's data (budget in `[teacher.pretrain]`), saves it, and then loads it through this
//! factory.
//!
//! ```toml
//! [teacher]
//! kind = "transformer"
//! checkpoint = "runs/quickstart/teacher"
//! ```

use retort_core::registry::Factory;
use retort_core::{BuildContext, FrozenTeacher, Params, Result, Teacher};

use crate::models::transformer::{Transformer, TransformerConfig, TransformerParams};

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Teacher>> {
    let (cfg, checkpoint) = TransformerConfig::resolve(params, ctx.vocab_size)?;
    let dir = checkpoint.ok_or_else(|| {
        params.error(
            "checkpoint",
            "a transformer teacher needs a checkpoint directory (or let the pipeline pretrain it)",
        )
    })?;
    let model = Transformer::load(cfg, &dir, &ctx.device)?.frozen();
    Ok(Box::new(FrozenTeacher(Box::new(model))))
}

inventory::submit! {
    Factory::<dyn Teacher> {
        kind: "transformer",
        description: "frozen GPT-2-style decoder from a Hugging Face checkpoint (pretrained by the pipeline if none)",
        build, params: retort_core::registry::params_schema::<TransformerParams> }
}
