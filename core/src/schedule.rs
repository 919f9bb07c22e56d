//! Schedules: pure functions of training progress.

use crate::Progress;

/// A value that moves with training progress (learning-rate factor, temperature, weight).
pub trait Schedule: Send + Sync {
    /// The value at `progress`.
    fn value(&self, progress: Progress) -> f64;
}
