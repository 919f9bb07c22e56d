//! Training progress, the one input of every schedule.

/// Where a training phase stands: `step` of `total` optimizer steps (0-based step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Optimizer steps already taken in this phase.
    pub step: usize,
    /// Total optimizer steps of this phase.
    pub total: usize,
}

impl Progress {
    /// Progress at `step` of `total`.
    pub fn new(step: usize, total: usize) -> Self {
        Progress { step, total }
    }

    /// Fraction done in `[0, 1]`; 1.0 when `total` is zero.
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            (self.step as f64 / self.total as f64).clamp(0.0, 1.0)
        }
    }
}
