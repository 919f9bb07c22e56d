//! Built-in schedules: pure functions of progress.

pub mod basic;
pub mod shaped;
