//! retort-host: assembles a distillation pipeline from one config, trains the teacher (when it
//! has no checkpoint), distills the student, trains a scratch baseline, evaluates all three and
//! writes the run directory (`report.json`, `report.md`, `metrics.jsonl`,
//! `config.resolved.toml`, the student's weights).

pub mod batching;
pub mod cache_cmd;
pub mod checkpoint;
pub mod cli;
pub mod config_load;
pub mod device;
pub mod eval;
pub mod eval_cmd;
pub mod generate;
pub mod kdbench;
pub mod optim;
pub mod pipeline;
pub mod plot;
pub mod plugin_loader;
pub mod report;
pub mod run;
pub mod rundir;
pub mod scaffold;
pub mod trainer;
pub mod vocab;

/// The registry of every built-in plugin.
pub fn builtin_registry() -> retort_core::Result<retort_core::Registry> {
    retort_plugins::link();
    retort_core::Registry::from_inventory()
}
