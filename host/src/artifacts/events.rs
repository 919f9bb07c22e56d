//! The metrics records of a run: one typed [`Event`] per line of `metrics.jsonl`.
//!
//! The engine writes events through a [`Recorder`], which hands each one, serialised once as a
//! JSON object tagged by `"event"`, to every observer plugin (`jsonl` writes
//! `metrics.jsonl`). The plots and the report read the same types back with [`read_events`],
//! so the writer and the readers cannot drift apart. Non-finite numbers are written as `null`
//! (JSON has no NaN) and read back as NaN.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use retort_core::{Error, Observer, Result};

use super::lenient;
use super::report::{EvalResult, Report};

/// One record of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A stage begins: its parameter groups.
    ParamGroups(ParamGroupsRecord),
    /// A logged training step.
    Train(TrainRecord),
    /// A step skipped for a non-finite loss or gradient (no update).
    Skip(SkipRecord),
    /// A periodic evaluation.
    Eval(EvalRecord),
    /// The end of a stage of a multi-stage phase, with its evaluation.
    StageEnd(StageEndRecord),
    /// Early stopping ended the phase.
    EarlyStop(EarlyStopRecord),
    /// The best evaluation of a phase under early stopping (the weights kept).
    Best(BestRecord),
    /// The run's final report.
    Report(Box<ReportRecord>),
    /// A record of a kind this version does not know (written by a plugin or a newer retort).
    #[serde(other)]
    Other,
}

/// Where in a phase a record was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct At {
    /// Phase label: `teacher`, `student` or `baseline`.
    pub phase: String,
    /// Stage name (`main` for a phase without stages).
    pub stage: String,
    /// Steps of the phase done.
    pub step: usize,
}

/// `param_groups`: the optimizer's parameter groups at the start of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamGroupsRecord {
    /// Phase, stage, and the stage's first step.
    #[serde(flatten)]
    pub at: At,
    /// Steps of the stage.
    pub steps: usize,
    /// Peak learning rate at the stage's start.
    #[serde(deserialize_with = "lenient::f64")]
    pub lr: f64,
    /// The groups.
    pub groups: Vec<GroupSummary>,
}

/// A parameter group as logged at the start of a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The pattern, or `default`.
    pub pattern: String,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of scalar parameters.
    pub parameters: usize,
    /// Learning-rate factor.
    pub lr_mult: f64,
    /// Weight decay, or `default rule`.
    pub weight_decay: String,
}

/// `train`: one logged optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Phase, stage and step.
    #[serde(flatten)]
    pub at: At,
    /// Total objective `sum_i w_i term_i`.
    #[serde(deserialize_with = "lenient::f64")]
    pub loss: f64,
    /// Each term's value (unweighted), by term name.
    #[serde(deserialize_with = "lenient::map")]
    pub terms: BTreeMap<String, f64>,
    /// Each term's effective weight (after the router), by term name.
    #[serde(deserialize_with = "lenient::map")]
    pub weights: BTreeMap<String, f64>,
    /// Scheduled values of the terms (`kl.temperature`).
    #[serde(deserialize_with = "lenient::map")]
    pub scalars: BTreeMap<String, f64>,
    /// The router's own quantities.
    #[serde(deserialize_with = "lenient::map")]
    pub router: BTreeMap<String, f64>,
    /// Learning rate of the step.
    #[serde(deserialize_with = "lenient::f64")]
    pub lr: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "lenient::f64")]
    pub grad_norm: f64,
    /// Gradient norm per parameter group (by pattern).
    #[serde(deserialize_with = "lenient::map")]
    pub grad_norm_groups: BTreeMap<String, f64>,
    /// Training tokens of the phase so far.
    pub tokens: usize,
    /// Tokens per second since the phase (re)started.
    #[serde(deserialize_with = "lenient::f64")]
    pub tokens_per_s: f64,
    /// Seconds since the phase (re)started.
    #[serde(deserialize_with = "lenient::f64")]
    pub elapsed_s: f64,
    /// Steps skipped so far.
    pub skipped_total: usize,
    /// What the on-policy steps since the previous train record sampled (none: no step did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_policy: Option<OnPolicyRecord>,
}

/// The `on_policy` object of a train record: the on-policy steps since the previous record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnPolicyRecord {
    /// On-policy steps since the previous record.
    pub steps: usize,
    /// Mean sampled tokens per sequence.
    pub completion_len: f64,
    /// Fraction of the samples that ended with the end-of-sequence token.
    pub eos_rate: f64,
    /// The teacher's mean `-log p` of the sampled tokens (nats per token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_nll: Option<f64>,
    /// Sampled tokens per second of sampling.
    pub rollout_tokens_per_s: f64,
    /// Fraction of the on-policy steps' wall time spent sampling.
    pub generation_share: f64,
}

/// `skip`: a step with a non-finite loss or gradient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkipRecord {
    /// Phase, stage and step.
    #[serde(flatten)]
    pub at: At,
    /// What was non-finite (`loss term \`kl\``, `the gradient norm`).
    pub cause: String,
    /// Its value as text (`NaN`, `inf`).
    pub value: String,
    /// Steps skipped so far.
    pub skipped_total: usize,
}

/// `eval`: a periodic evaluation of the weights the phase would export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Phase, stage and step.
    #[serde(flatten)]
    pub at: At,
    /// The figures.
    #[serde(flatten)]
    pub result: EvalResult,
}

/// `stage_end`: the evaluation at the end of a stage, with the stage's final training loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEndRecord {
    /// Phase, stage and step.
    #[serde(flatten)]
    pub at: At,
    /// The figures.
    #[serde(flatten)]
    pub result: EvalResult,
    /// Mean total loss over the stage's last (up to) 10 applied steps.
    pub final_loss: Option<f64>,
}

/// Early stopping's record: the best evaluation so far and how many evaluations since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyState {
    /// Metric name.
    pub metric: String,
    /// Best value seen (none before the first evaluation).
    pub best: Option<f64>,
    /// Step (of the phase) of the best value.
    pub best_step: usize,
    /// Evaluations since the best one.
    pub bad_evals: usize,
}

/// `early_stop`: early stopping ended the phase at `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopRecord {
    /// Phase, stage and step.
    #[serde(flatten)]
    pub at: At,
    /// Early stopping's record at that point.
    pub record: Option<EarlyState>,
}

/// `best`: the evaluation whose weights the phase kept and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    /// Phase label.
    pub phase: String,
    /// Metric name.
    pub metric: String,
    /// Its value.
    #[serde(deserialize_with = "lenient::f64")]
    pub value: f64,
    /// Step of the phase at which it was measured.
    pub step: usize,
}

/// `report`: the run's final report (also in `report.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRecord {
    /// The report.
    pub report: Report,
}

/// Sends events to the run's observers.
pub struct Recorder {
    observers: Vec<Box<dyn Observer>>,
}

impl Recorder {
    /// A recorder writing to `observers`.
    pub fn new(observers: Vec<Box<dyn Observer>>) -> Self {
        Recorder { observers }
    }

    /// A recorder that keeps nothing (benchmarks, tests).
    pub fn none() -> Self {
        Recorder { observers: Vec::new() }
    }

    /// Hands `event`, serialised once, to every observer.
    pub fn record(&mut self, event: &Event) -> Result<()> {
        let value =
            serde_json::to_value(event).map_err(|e| retort_core::Error::failed("serialising a metrics record", e))?;
        for o in &mut self.observers {
            o.record(&value)?;
        }
        Ok(())
    }

    /// Flushes every observer (the end of a run).
    pub fn finish(&mut self) -> Result<()> {
        self.observers.iter_mut().try_for_each(|o| o.finish())
    }
}

/// Reads the events of `metrics.jsonl` in `dir`; a line that is not a record is an input error
/// naming the file and line.
pub fn read_events(dir: &Path) -> Result<Vec<Event>> {
    let p = dir.join("metrics.jsonl");
    let bytes = std::fs::read(&p).map_err(|e| Error::io("reading metrics", &p, e))?;
    let mut events = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let at = || format!("{}:{}", p.display(), i + 1);
        let line = std::str::from_utf8(line).map_err(|e| Error::input_failed(at(), "not UTF-8 text", e))?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(serde_json::from_str(line).map_err(|e| Error::input_failed(at(), "not a metrics record", e))?);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_lines_are_input_errors_naming_file_and_line() {
        let d = tempfile::tempdir().expect("tmp");
        let metrics = d.path().join("metrics.jsonl");
        for (text, line, what) in [
            (&b"\n\n\xff\xfe\n"[..], 3, "not UTF-8"),
            (&b"\nnot json\n"[..], 2, "not a metrics record"),
        ] {
            std::fs::write(&metrics, text).expect("w");
            let err = read_events(d.path()).expect_err("garbage");
            assert_eq!(err.exit_code(), 2);
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("metrics.jsonl:{line}")) && msg.contains(what),
                "{msg}"
            );
        }
        std::fs::write(&metrics, "\n  \n").expect("w");
        assert!(read_events(d.path()).expect("blank lines").is_empty());
    }
}
