//! The run directory: what a run writes where, created fresh or refused when it already holds
//! another run, reopened to resume one.
//!
//! ```text
//! runs/<name>/
//!   config.resolved.toml   the config as resolved (what --resume reads)
//!   metrics.jsonl          one event per line (artifacts::events)
//!   progress.json          the phases finished, with their statistics (artifacts::progress)
//!   checkpoints/<phase>/   resumable checkpoints (artifacts::checkpoint)
//!   teacher/ student/ baseline/   the models, Hugging Face layout
//!   report.json report.md plots/
//! ```

use std::path::{Path, PathBuf};

use retort_core::config::RunConfig;
use retort_core::{fsutil, Error, Result};

/// Files whose presence marks a directory as holding a run.
pub const RUN_MARKERS: &[&str] = &["config.resolved.toml", "metrics.jsonl", "report.json", "report.md"];

const RESOLVED_CONFIG: &str = "config.resolved.toml";

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Makes `path` ready for a new run. A directory holding another run is refused unless
    /// `force`, in which case only its metrics log is removed (every other file is replaced
    /// atomically).
    pub fn create(path: &Path, force: bool) -> Result<Self> {
        prepare(path, force)?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// The run in `path`, to resume; an input error if it holds none.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.join(RESOLVED_CONFIG).is_file() {
            return Err(not_a_run(path));
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// The resolved config of the run in `path` (what `--resume` reads).
    pub fn resolved_config(path: &Path) -> Result<PathBuf> {
        let file = path.join(RESOLVED_CONFIG);
        if file.is_file() {
            Ok(file)
        } else {
            Err(not_a_run(path))
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// Where the checkpoints of `phase` go.
    pub fn checkpoints(&self, phase: &str) -> PathBuf {
        self.path.join("checkpoints").join(phase)
    }

    /// Where the trained model of `phase` is exported.
    pub fn model(&self, phase: &str) -> PathBuf {
        self.path.join(phase)
    }

    /// Writes `config.resolved.toml`, with a header naming where the config came from.
    pub fn write_resolved_config(&self, config: &RunConfig, source: &str) -> Result<()> {
        let resolved = toml::to_string_pretty(config)
            .map_err(|e| retort_core::Error::failed("serialising the resolved config", e))?;
        let header = format!("# Resolved config of this run (source: {source}).\n");
        fsutil::write_atomic(
            &self.path.join(RESOLVED_CONFIG),
            format!("{header}{resolved}").as_bytes(),
        )
    }

    /// Cuts `metrics.jsonl` back to `len` bytes (what a resumed checkpoint saw).
    pub fn truncate_metrics(&self, len: u64) -> Result<()> {
        let p = self.metrics();
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
            f.set_len(len)
                .map_err(|e| Error::io("truncating metrics to the checkpoint", &p, e))?;
            f.sync_all().map_err(|e| Error::io("syncing metrics", &p, e))?;
        }
        Ok(())
    }
}

fn not_a_run(path: &Path) -> Error {
    Error::input(
        format!("--resume {}", path.display()),
        format!("is not a retort run directory (no {RESOLVED_CONFIG})"),
    )
}

fn prepare(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(Error::input(
                format!("out dir {}", dir.display()),
                "exists and is not a directory",
            ));
        }
        let found: Vec<&str> = RUN_MARKERS.iter().copied().filter(|m| dir.join(m).exists()).collect();
        if !found.is_empty() {
            if !force {
                return Err(Error::input(
                    format!("out dir {}", dir.display()),
                    format!(
                        "holds another run ({}); choose another --out, or pass --force to replace it",
                        found.join(", ")
                    ),
                ));
            }
            let metrics = dir.join("metrics.jsonl");
            if metrics.exists() {
                std::fs::remove_file(&metrics).map_err(|e| Error::io("removing old metrics", &metrics, e))?;
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating run directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_existing_run_without_force() {
        let d = tempfile::tempdir().expect("tmp");
        let run = d.path().join("r");
        RunDir::create(&run, false).expect("fresh");
        std::fs::write(run.join("report.json"), "{}").expect("w");
        let err = RunDir::create(&run, false).expect_err("must fail");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--force"));
        assert_eq!(std::fs::read_to_string(run.join("report.json")).expect("r"), "{}");
        RunDir::create(&run, true).expect("forced");
    }

    #[test]
    fn a_directory_without_a_run_cannot_be_resumed() {
        let d = tempfile::tempdir().expect("tmp");
        let err = RunDir::open(d.path()).expect_err("no run");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("is not a retort run directory"), "{err}");
    }
}
