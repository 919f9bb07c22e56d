//! What a phase's checkpoint holds besides tensors.

use serde::{Deserialize, Serialize};

use crate::artifacts::events::EarlyState;
use crate::artifacts::report::StageStats;
use crate::artifacts::run_dir::LogMark;
use crate::engine::rollout::RolloutTotals;

use super::loss_scale::LossScaler;

/// Everything besides tensors that a phase needs to continue exactly where it was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseState {
    /// Id of the run that wrote the checkpoint (a resume refuses another run's).
    pub run_id: String,
    /// Phase label.
    pub phase: String,
    /// Steps done (the next step index).
    pub step: usize,
    /// AdamW's step count.
    pub adam_t: i32,
    /// Position of the batch sampler's random stream (decimal, it is a u128).
    pub batch_stream_pos: String,
    /// The router's own state.
    pub router: serde_json::Value,
    /// Steps skipped so far.
    pub skipped: usize,
    /// Consecutive skips at this point.
    pub consecutive_skips: usize,
    /// Total loss of every applied step so far.
    pub losses: Vec<f64>,
    /// `metrics.jsonl` when the checkpoint was taken (cut back to it on resume).
    pub metrics: LogMark,
    /// Early stopping's record so far, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early: Option<EarlyState>,
    /// The stages of the phase begun so far.
    #[serde(default)]
    pub stages: Vec<StageStats>,
    /// What the on-policy steps since the last train record sampled.
    #[serde(default)]
    pub rollouts: RolloutTotals,
    /// Ranks of the data-parallel run that wrote it (1: one process).
    #[serde(default = "one")]
    pub ranks: usize,
    /// The loss scale and its record, when the phase scales its loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScaler>,
}

fn one() -> usize {
    1
}

/// What `best/` holds besides the best weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BestState {
    /// Phase label.
    pub phase: String,
    /// Step of the phase at which the weights were evaluated.
    pub step: usize,
    /// Early stopping's record at that point.
    pub early: EarlyState,
}
