//! retort-core: the contracts of retort, a knowledge-distillation framework on candle.
//!
//! Everything a plugin implements or consumes lives here: the plugin traits ([`Teacher`],
//! [`Student`], [`LossTerm`], [`Schedule`], [`Router`], [`DataSource`], [`Tokenizer`],
//! [`Observer`]), the tensors-in/tensors-out types ([`Batch`], [`Outputs`], [`StepContext`]),
//! the [`Registry`] of factories collected with `inventory`, the serde-facing config types,
//! the one [`Error`] enum, and the differentiable [`ops`] that terms and plugins share.
//!
//! Arrows point one way: `plugins -> core`, `host -> plugins, core`, `sdk -> core`.

pub mod batch;
pub mod config;
pub mod data;
pub mod de;
pub mod decode;
pub mod error;
pub mod fsutil;
pub mod loss;
pub mod loss_scale;
pub mod memory;
pub mod model;
pub mod observer;
pub mod ops;
pub mod params;
pub mod plugin;
pub mod progress;
pub mod registry;
pub mod router;
pub mod scalar;
pub mod schedule;
pub mod taps;

pub use batch::{Batch, BatchSource};
pub use data::{DataSource, SourceLikelihood, Split, Tokenizer};
pub use decode::Decoder;
pub use error::{BoxError, Error, Result};
pub use loss::{LossTerm, StepContext};
pub use model::{FrozenTeacher, Model, ModelInfo, Student, Teacher};
pub use observer::Observer;
pub use params::Params;
pub use plugin::Registrar;
pub use progress::Progress;
pub use registry::{BuildContext, Category, Entry, Factory, Registry};
pub use router::{Router, TermSignals};
pub use scalar::{Scalar, ScalarSpec};
pub use schedule::Schedule;
pub use taps::{Outputs, TapSet, LM_HEAD_TAP};

/// Re-export of the candle version retort is built against, so plugins use the same one.
pub use candle_core as candle;
/// Re-export of `inventory`, used by `inventory::submit!` in statically linked plugins.
pub use inventory;
/// Re-export of `schemars`, to derive the parameter schemas plugins declare.
pub use schemars;
/// Re-export of `serde_json` (router state, parameter schemas).
pub use serde_json;
