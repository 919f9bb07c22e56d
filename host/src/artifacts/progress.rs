//! `progress.json`: the phases a run has finished, with their statistics, so that a resumed run
//! skips them and still reports them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Error, Result};

use super::report::PhaseStats;
use super::run_dir::RunDir;

/// The finished phases of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunProgress {
    completed: BTreeMap<String, CompletedPhase>,
}

/// A finished phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CompletedPhase {
    stats: PhaseStats,
    /// Length of `metrics.jsonl` when it finished.
    metrics_len: u64,
}

const FILE: &str = "progress.json";

impl RunProgress {
    /// The progress recorded in `dir` (none yet: empty).
    pub fn load(dir: &RunDir) -> Result<Self> {
        let p = dir.path().join(FILE);
        if !p.is_file() {
            return Ok(RunProgress::default());
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io("reading run progress", &p, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::input_failed(format!("run progress {}", p.display()), "corrupted", e))
    }

    /// The statistics of `phase`, if it finished.
    pub fn completed(&self, phase: &str) -> Option<&PhaseStats> {
        self.completed.get(phase).map(|c| &c.stats)
    }

    /// The length of `metrics.jsonl` when the last finished phase ended.
    pub fn metrics_len(&self) -> u64 {
        self.completed.values().map(|c| c.metrics_len).max().unwrap_or(0)
    }

    /// Records `phase` as finished with `stats` and saves the file atomically.
    pub fn complete(&mut self, dir: &RunDir, phase: &str, stats: &PhaseStats) -> Result<()> {
        let metrics_len = std::fs::metadata(dir.metrics()).map(|m| m.len()).unwrap_or(0);
        self.completed.insert(
            phase.to_string(),
            CompletedPhase {
                stats: stats.clone(),
                metrics_len,
            },
        );
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| retort_core::Error::failed("serialising run progress", e))?;
        fsutil::write_atomic(&dir.path().join(FILE), &json)
    }
}
