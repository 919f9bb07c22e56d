//! retort-sdk: what a third-party retort plugin depends on.
//!
//! It re-exports the contracts of `retort-core` and the exact candle version retort is built
//! against. A statically linked plugin crate registers its kinds with `inventory::submit!`
//! exactly like the built-ins:
//!
//! ```
//! use retort_sdk::prelude::*;
//!
//! struct Zero;
//! impl LossTerm for Zero {
//!     fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
//!         Ok(ctx.student.logits.zeros_like()?.sum_all()?)
//!     }
//!     fn needs_teacher(&self) -> bool { false }
//! }
//! fn build(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> { Ok(Box::new(Zero)) }
//! retort_sdk::inventory::submit! {
//!     Factory::<dyn LossTerm> { kind: "zero", description: "always 0", build }
//! }
//! ```
//!
//! Loading plugins from dynamic libraries at run time (`export_plugin!`, ABI fingerprint) is
//! not part of this crate yet.

pub use retort_core::*;

/// Everything a plugin usually needs in scope.
pub mod prelude {
    pub use retort_core::candle::{DType, Device, Tensor, Var, D};
    pub use retort_core::registry::Factory;
    pub use retort_core::{
        Batch, BuildContext, DataSource, Error, LossTerm, Model, Observer, Outputs, Params, Progress, Result, Router,
        Schedule, Split, StepContext, Student, TapSet, Teacher, TermSignals, Tokenizer,
    };
}
