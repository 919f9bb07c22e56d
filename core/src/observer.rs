//! Observers: sinks for metrics records.

use crate::Result;

/// Receives every metrics record of a run (one JSON object per logged step or eval).
pub trait Observer: Send {
    /// Handles one record.
    fn record(&mut self, record: &serde_json::Value) -> Result<()>;
    /// Flushes at the end of the run.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
