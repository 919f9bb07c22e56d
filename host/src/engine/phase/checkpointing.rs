//! When and where a phase writes its resumable checkpoints.

use std::path::PathBuf;

use retort_core::Result;

use crate::artifacts::run_dir::{mark_log, LogMark};

/// Where and how often a phase writes resumable checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointPolicy {
    /// `checkpoints/<phase>` of the run.
    pub root: PathBuf,
    /// The run's id, written into every checkpoint.
    pub run_id: String,
    /// Every this many steps (0: only at stage boundaries).
    pub every: usize,
    /// Keep the newest this many.
    pub keep: usize,
    /// The metrics file whose mark each checkpoint records (cut back to it on resume).
    pub metrics: Option<PathBuf>,
    /// Whether this process writes them (rank 0); the other ranks of a data-parallel run only
    /// read them (`best/` on a resume).
    pub writes: bool,
}

impl CheckpointPolicy {
    /// Whether a checkpoint is due after step `done` of a phase of `total` steps: every
    /// `every` steps but the last (the phase's end writes the model itself), and at the end of
    /// every stage but the last (so a resume restarts the next stage as an uninterrupted run).
    pub fn due(&self, done: usize, total: usize, ends_a_stage_before_the_last: bool) -> bool {
        self.writes
            && ((self.every > 0 && done.is_multiple_of(self.every) && done != total) || ends_a_stage_before_the_last)
    }

    /// Where the metrics file stands now (an empty mark without one).
    pub fn metrics_mark(&self) -> Result<LogMark> {
        match &self.metrics {
            Some(m) => mark_log(m),
            None => Ok(LogMark::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_every_n_steps_but_the_last_and_at_inner_stage_ends() {
        let p = CheckpointPolicy {
            root: PathBuf::from("x"),
            run_id: String::new(),
            every: 10,
            keep: 2,
            metrics: None,
            writes: true,
        };
        assert!(p.due(10, 30, false) && p.due(20, 30, false));
        assert!(!p.due(30, 30, false) && !p.due(15, 30, false));
        assert!(p.due(15, 30, true));
        let reader = CheckpointPolicy { writes: false, ..p };
        assert!(!reader.due(10, 30, false) && !reader.due(15, 30, true));
    }
}
