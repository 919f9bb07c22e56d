//! The run directory: created fresh, or refused when it already holds another run.

use std::path::Path;

use retort_core::{Error, Result};

/// Files whose presence marks a directory as holding a run.
pub const RUN_MARKERS: &[&str] = &["config.resolved.toml", "metrics.jsonl", "report.json", "report.md"];

/// Makes `dir` ready for a new run. A directory holding another run is refused unless `force`,
/// in which case only its metrics log is removed (every other file is replaced atomically).
pub fn prepare(dir: &Path, force: bool) -> Result<()> {
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
        prepare(&run, false).expect("fresh");
        std::fs::write(run.join("report.json"), "{}").expect("w");
        let err = prepare(&run, false).expect_err("must fail");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--force"));
        assert_eq!(std::fs::read_to_string(run.join("report.json")).expect("r"), "{}");
        prepare(&run, true).expect("forced");
    }
}
