//! The guard against non-finite steps: a step whose loss or gradient is NaN or infinite is
//! skipped (no update); too many in a row stop the phase (`train.max_consecutive_skips`).

use retort_core::{Error, Result};

/// Skip counters of a phase.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct SkipGuard {
    /// Steps skipped so far.
    pub skipped: usize,
    /// Skipped in a row up to now.
    pub consecutive: usize,
}

impl SkipGuard {
    /// Counts a skipped step (and says so in the log).
    pub fn count(&mut self, label: &str, step: usize, what: &str, value: f64) {
        self.skipped += 1;
        self.consecutive += 1;
        tracing::warn!("phase `{label}` step {step}: {what} is {value}; step skipped (no update)");
    }

    /// Counts a step skipped for an overflow of a dynamic loss scale: in the total, not in
    /// the run of consecutive skips (the scale was halved, the next step will likely pass).
    pub fn count_overflow(&mut self, label: &str, step: usize, what: &str) {
        self.skipped += 1;
        tracing::info!("phase `{label}` step {step}: {what}; step skipped");
    }

    /// An error when more than `max` steps were skipped in a row.
    pub fn check(&self, label: &str, step: usize, what: &str, value: f64, max: usize) -> Result<()> {
        if self.consecutive > max {
            return Err(Error::Runtime(format!(
                "phase `{label}`: {} consecutive steps skipped for non-finite values (last: {what} is {value} at \
                 step {step}); stopping (train.max_consecutive_skips = {max}). The last checkpoint written is \
                 intact; lower train.lr or check the data",
                self.consecutive
            )));
        }
        Ok(())
    }

    /// An applied step ends a run of skips.
    pub fn applied(&mut self) {
        self.consecutive = 0;
    }
}
