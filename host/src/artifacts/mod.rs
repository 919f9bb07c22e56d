//! What a run leaves on disk.
pub mod checkpoint;
pub mod plots;
pub mod plugin_crate;
pub mod report;
pub mod run_dir;
