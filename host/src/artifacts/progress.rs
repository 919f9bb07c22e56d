//! `progress.json`: the phases a run has finished, with their statistics, so that a resumed run
//! skips them and still reports them.
//!
//! Everything a resume takes from it is verified: the file carries the SHA-256 of its own body
//! and the run id of its run, and each finished phase the checksum of every file of its exported
//! model, which a resume loads instead of training the phase again.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Error, Result};

use super::digest::{sha256_file, sha256_hex};
use super::report::PhaseStats;
use super::run_dir::{LogMark, RunDir};

/// The finished phases of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunProgress {
    run_id: String,
    completed: BTreeMap<String, CompletedPhase>,
}

/// A finished phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CompletedPhase {
    stats: PhaseStats,
    /// `metrics.jsonl` when it finished.
    metrics: LogMark,
    /// SHA-256 of every file of the exported model, by file name.
    model_sha256: BTreeMap<String, String>,
}

/// The file: the body and the digest of its JSON.
#[derive(Serialize, Deserialize)]
struct ProgressFile {
    progress: RunProgress,
    sha256: String,
}

const FILE: &str = "progress.json";

impl RunProgress {
    /// The progress recorded in `dir` (none yet: empty), verified: its digest, its run id and
    /// the exported model of every finished phase.
    pub fn load(dir: &RunDir) -> Result<Self> {
        let p = dir.path().join(FILE);
        if !p.is_file() {
            return Ok(RunProgress {
                run_id: dir.run_id().to_string(),
                ..RunProgress::default()
            });
        }
        let what = format!("run progress {}", p.display());
        let bytes = std::fs::read(&p).map_err(|e| Error::io("reading run progress", &p, e))?;
        let file: ProgressFile =
            serde_json::from_slice(&bytes).map_err(|e| Error::input_failed(what.clone(), "corrupted", e))?;
        if body_digest(&file.progress)? != file.sha256 {
            return Err(Error::input(what, "checksum mismatch: the file was altered"));
        }
        if file.progress.run_id != dir.run_id() {
            return Err(Error::input(
                what,
                format!(
                    "belongs to run {}, not to this run {}",
                    file.progress.run_id,
                    dir.run_id()
                ),
            ));
        }
        for (phase, done) in &file.progress.completed {
            verify_model(&dir.model(phase), &done.model_sha256)?;
        }
        Ok(file.progress)
    }

    /// The statistics of `phase`, if it finished.
    pub fn completed(&self, phase: &str) -> Option<&PhaseStats> {
        self.completed.get(phase).map(|c| &c.stats)
    }

    /// `metrics.jsonl` when the last finished phase ended (empty before any).
    pub fn metrics_mark(&self) -> LogMark {
        self.completed
            .values()
            .map(|c| c.metrics.clone())
            .max_by_key(|m| m.len)
            .unwrap_or_else(|| LogMark {
                len: 0,
                sha256: sha256_hex(b""),
            })
    }

    /// Records `phase` as finished with `stats` (its model exported into the run directory) and
    /// saves the file atomically.
    pub fn complete(&mut self, dir: &RunDir, phase: &str, stats: &PhaseStats) -> Result<()> {
        self.run_id = dir.run_id().to_string();
        let done = CompletedPhase {
            stats: stats.clone(),
            metrics: dir.mark_metrics()?,
            model_sha256: digest_model(&dir.model(phase))?,
        };
        self.completed.insert(phase.to_string(), done);
        let file = ProgressFile {
            sha256: body_digest(self)?,
            progress: self.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::failed("serialising run progress", e))?;
        fsutil::write_atomic(&dir.path().join(FILE), &json)
    }
}

/// SHA-256 of the body's compact JSON, taken through `serde_json::Value` so that a reader who
/// parses the file and re-serialises its `progress` gets the same bytes.
fn body_digest(progress: &RunProgress) -> Result<String> {
    let failed = |e| Error::failed("serialising run progress", e);
    let body = serde_json::to_value(progress)
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(failed)?;
    Ok(sha256_hex(&body))
}

/// The SHA-256 of every file directly in `model_dir`.
fn digest_model(model_dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let read = std::fs::read_dir(model_dir).map_err(|e| Error::io("listing the exported model", model_dir, e))?;
    for entry in read {
        let path = entry
            .map_err(|e| Error::io("listing the exported model", model_dir, e))?
            .path();
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.insert(name, sha256_file(&path)?);
        }
    }
    Ok(out)
}

fn verify_model(model_dir: &Path, want: &BTreeMap<String, String>) -> Result<()> {
    for (name, sha) in want {
        let path = model_dir.join(name);
        let what = || format!("resume: exported model file {}", path.display());
        if !path.is_file() {
            return Err(Error::input(what(), "is missing"));
        }
        let got = sha256_file(&path)?;
        if &got != sha {
            return Err(Error::input(
                what(),
                format!("checksum mismatch (changed since its phase finished): sha256 {got}, expected {sha}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> PhaseStats {
        PhaseStats {
            steps: 3,
            skipped: 0,
            tokens: 10,
            wall_s: 1.0,
            tokens_per_s: 10.0,
            losses: vec![1.5, 1.25, 1.0],
            stages: Vec::new(),
            best: None,
            stopped_early_at: None,
        }
    }

    fn run_with_a_finished_phase(root: &Path) -> RunDir {
        let dir =
            RunDir::create(&root.join("r"), false, &Default::default(), "test", &Default::default()).expect("create");
        std::fs::create_dir_all(dir.model("student")).expect("mkdir");
        std::fs::write(dir.model("student").join("model.safetensors"), b"weights").expect("w");
        RunProgress::load(&dir)
            .expect("empty")
            .complete(&dir, "student", &stats())
            .expect("complete");
        dir
    }

    #[test]
    fn round_trips_and_refuses_an_altered_record_or_model() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = run_with_a_finished_phase(d.path());
        let p = RunProgress::load(&dir).expect("load");
        assert!(p.completed("student").is_some() && p.completed("teacher").is_none());
        let file = dir.path().join(FILE);
        let text = std::fs::read_to_string(&file).expect("r");
        std::fs::write(&file, text.replacen("\"steps\": 3", "\"steps\": 4", 1)).expect("w");
        let err = RunProgress::load(&dir).expect_err("altered record");
        assert!(err.to_string().contains("checksum"), "{err}");
        std::fs::write(&file, b"\xff\xfe not even text").expect("w");
        let err = RunProgress::load(&dir).expect_err("garbage");
        assert!(err.to_string().contains("corrupted"), "{err}");
        assert_eq!(err.exit_code(), 2, "a damaged file is an input error");
        std::fs::write(&file, text).expect("w");
        std::fs::write(dir.model("student").join("model.safetensors"), b"other").expect("w");
        let err = RunProgress::load(&dir).expect_err("altered model");
        assert!(err.to_string().contains("model.safetensors"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn a_record_of_another_run_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = run_with_a_finished_phase(d.path());
        let record = std::fs::read(dir.path().join(FILE)).expect("r");
        let other = RunDir::create(
            &d.path().join("o"),
            false,
            &Default::default(),
            "test",
            &Default::default(),
        )
        .expect("create");
        std::fs::write(other.path().join(FILE), record).expect("w");
        let err = RunProgress::load(&other).expect_err("another run's record");
        assert!(err.to_string().contains("belongs to run"), "{err}");
    }
}
