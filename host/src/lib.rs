//! retort-host: assembles a distillation pipeline from one config, trains the teacher (when it
//! has no checkpoint), distills the student, trains a scratch baseline, evaluates all three and
//! writes the run directory (`report.json`, `report.md`, `metrics.jsonl`,
//! `config.resolved.toml`, the student's weights).

pub mod artifacts;
pub mod assemble;
pub mod cli;
pub mod engine;

/// The process allocator of everything linking this crate (the `retort` binary, its examples and
/// benches): mimalloc keeps freed blocks for reuse instead of returning them to the OS and
/// faulting them in again on the next step, which glibc's malloc does with the multi-megabyte
/// activations and gradients of every step (docs/performance.md has the measurements). Its
/// `override` feature also replaces C `malloc`/`free`, so memory allocated by a dynamically
/// loaded plugin (built with Rust's default system allocator) and freed here, or the other way
/// round, goes through the same allocator. Turn it off with `--no-default-features`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The registry of every built-in plugin.
pub fn builtin_registry() -> retort_core::Result<retort_core::Registry> {
    retort_plugins::link();
    retort_core::Registry::from_inventory()
}

/// A runtime failure of `context` caused by `source`.
// TEMPORARY until core's error with a source lands.
pub(crate) fn failed(context: &str, source: impl std::fmt::Display) -> retort_core::Error {
    retort_core::Error::Runtime(format!("{context}: {source}"))
}
