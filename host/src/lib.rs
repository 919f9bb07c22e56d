//! retort-host: a distillation run from one config, and the `retort` binary.
//!
//! The crate is laid out by responsibility, each layer using only the ones below it (a test,
//! `tests/tests/architecture.rs`, keeps it so):
//!
//! - [`cli`]: the command line. One file per subcommand: its `Args` struct and a `run` that
//!   parses, calls into the layers below and prints.
//! - [`engine`]: runs what was assembled. [`engine::run`] drives a run's phases (teacher
//!   pretraining, distillation, scratch baseline); [`engine::phase`] is the training loop, a
//!   small state machine over stages and steps; beside them the optimizer, batching,
//!   evaluation, the logit cache builder, generation.
//! - [`assemble`]: a config becomes a validated [`assemble::Pipeline`]: config loading (file,
//!   environment, `--set`), plugin libraries, every component built and checked against the
//!   others, and the setup of each phase.
//! - [`artifacts`]: what a run leaves on disk and reads back: the run directory, typed metrics
//!   events, progress, generic checksummed checkpoints, the report and its plots, exported
//!   models, scaffolded plugin crates.
//!
//! Beside them, [`allocator`]: the process allocator (mimalloc) and its treatment of freed
//! memory, set up by the binary.
//!
//! One step of training, as data: batch -> teacher forward (no grad) -> student forward (with
//! the taps the terms ask for) -> each loss term -> router weights -> `sum_i w_i term_i` ->
//! backward -> AdamW -> events. See `docs/design.md` for the map with file names.

pub mod allocator;
pub mod artifacts;
pub mod assemble;
pub mod cli;
pub mod engine;

/// The registry of every built-in plugin.
pub fn builtin_registry() -> retort_core::Result<retort_core::Registry> {
    retort_plugins::link();
    retort_core::Registry::from_inventory()
}
