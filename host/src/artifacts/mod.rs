//! What retort leaves on disk and reads back: the run directory and its files (events, progress,
//! checkpoints, report, plots, exported models) and plugin crates scaffolded by
//! `retort new-plugin`. The lowest layer of the host: it knows nothing of the engine, the
//! assembly or the command line.

pub mod checkpoint;
pub mod digest;
pub mod events;
pub mod export;
mod lenient;
pub mod plots;
pub mod plugin_crate;
pub mod progress;
pub mod report;
pub mod run_dir;
pub mod run_inputs;
pub mod tokenizer_record;
