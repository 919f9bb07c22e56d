//! The engine: runs what assembly built.
//!
//! - [`run`]: a whole run, phase after phase, resumable, ending in the report.
//! - [`phase`]: one training phase, the loop over stages and steps.
//! - [`optim`], [`batching`], [`evaluate`], [`pool`]: what the loop uses; [`flags`]: parsers of
//!   the commands' flag values.
//! - [`cache`], [`generate`], [`model_eval`]: the other commands' work (the teacher logit cache,
//!   text generation, a model file's loss on a text).

pub mod batching;
pub mod cache;
pub mod evaluate;
pub mod flags;
pub mod generate;
pub mod generation_eval;
pub mod model_eval;
pub mod optim;
pub mod parallel;
pub mod phase;
pub mod pool;
pub mod rollout;
pub mod run;
