//! Training checkpoints that a killed run resumes from exactly.
//!
//! `checkpoints/<phase>/step-<NNNNNNNN>/` holds `model.safetensors` (every trained tensor: the
//! student's and the loss terms' own), `optimizer.safetensors` (AdamW moments `m.<name>`,
//! `v.<name>`) and `state.json` (step, Adam's step count, the batch sampler's stream position,
//! the router's state, skip counters, the per-step losses so far, the length of
//! `metrics.jsonl` at that moment, and the SHA-256 of both tensor files). A checkpoint is built
//! in a temporary directory, fsynced and renamed into place, so it either exists whole or not at
//! all; on load every checksum is verified. The last `keep` checkpoints of a phase are kept.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use retort_core::{fsutil, Error, Result};

/// Everything besides tensors that a phase needs to continue.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseState {
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
    /// Length of `metrics.jsonl` in bytes when the checkpoint was taken.
    pub metrics_len: u64,
    /// SHA-256 of each tensor file.
    pub files: BTreeMap<String, String>,
    /// Early stopping's record so far, when it is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early: Option<EarlyState>,
    /// The stages of the phase begun so far.
    #[serde(default)]
    pub stages: Vec<crate::engine::phase::StageStats>,
}

/// Early stopping's record: the best evaluation so far and how many evaluations since.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

/// A checkpoint read back and verified.
pub struct LoadedCheckpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its state.
    pub state: PhaseState,
    /// Trained tensors by name.
    pub model: HashMap<String, Tensor>,
    /// Optimizer tensors by name.
    pub optimizer: HashMap<String, Tensor>,
}

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| Error::io("reading checkpoint file", path, e))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint of `state` under `root` (e.g. `checkpoints/student`) atomically and
/// keeps the newest `keep` (the `best/` checkpoint is not counted and never pruned).
pub fn write(
    root: &Path,
    state: PhaseState,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    let name = step_dir_name(state.step);
    let final_dir = write_dir(root, &name, state, model, optimizer)?;
    let mut all = list(root)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        fs::remove_dir_all(&old).map_err(|e| Error::io("pruning old checkpoint", &old, e))?;
    }
    Ok(final_dir)
}

/// Writes (or replaces) `root/best`: the weights of the best evaluation so far, with no
/// optimizer state. Atomic like [`write`].
pub fn write_best(root: &Path, state: PhaseState, model: &HashMap<String, Tensor>) -> Result<PathBuf> {
    write_dir(root, BEST, state, model, &HashMap::new())
}

/// The `best/` checkpoint under `root`, verified, if there is one.
pub fn load_best(root: &Path, device: &Device) -> Result<Option<LoadedCheckpoint>> {
    let dir = root.join(BEST);
    if !dir.is_dir() {
        return Ok(None);
    }
    load(&dir, device).map(Some)
}

const BEST: &str = "best";

fn write_dir(
    root: &Path,
    name: &str,
    mut state: PhaseState,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(|e| Error::io("creating checkpoint directory", root, e))?;
    let final_dir = root.join(name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing stale temp checkpoint", &tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io("creating temp checkpoint", &tmp, e))?;
    for (file, tensors) in [(MODEL, model), (OPTIMIZER, optimizer)] {
        let path = tmp.join(file);
        candle_core::safetensors::save(tensors, &path)?;
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("syncing checkpoint file", &path, e))?;
        state.files.insert(file.to_string(), sha256_file(&path)?);
    }
    let json = serde_json::to_vec_pretty(&state).map_err(|e| Error::Runtime(e.to_string()))?;
    fsutil::write_atomic(&tmp.join(STATE), &json)?;
    if final_dir.exists() {
        // Move the old one aside first so that a kill leaves either the old or the new one.
        let old = root.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(&final_dir, &old).map_err(|e| Error::io("replacing checkpoint", &final_dir, e))?;
        fs::rename(&tmp, &final_dir).map_err(|e| Error::io("renaming checkpoint into place", &final_dir, e))?;
        fs::remove_dir_all(&old).map_err(|e| Error::io("removing replaced checkpoint", &old, e))?;
    } else {
        fs::rename(&tmp, &final_dir).map_err(|e| Error::io("renaming checkpoint into place", &final_dir, e))?;
    }
    if let Ok(d) = fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

impl LoadedCheckpoint {
    /// The checkpoint's model tensors for `vars`, in their order; a missing one is an input
    /// error naming the checkpoint.
    pub fn tensors_of(&self, vars: &[(String, candle_core::Var)]) -> Result<Vec<Tensor>> {
        vars.iter()
            .map(|(n, _)| {
                self.model.get(n).cloned().ok_or_else(|| {
                    Error::input(
                        format!("checkpoint {}", self.dir.display()),
                        format!("tensor `{n}` is missing"),
                    )
                })
            })
            .collect()
    }
}

/// Checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| Error::io("listing checkpoints", root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")))
        .collect();
    v.sort();
    Ok(v)
}

/// Reads and verifies one checkpoint; a missing, truncated or altered file is an input error
/// naming the file.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let bad = |file: &Path, m: String| Error::input(format!("checkpoint file {}", file.display()), m);
    let state_path = dir.join(STATE);
    let text = fs::read_to_string(&state_path).map_err(|e| bad(&state_path, format!("unreadable: {e}")))?;
    let state: PhaseState = serde_json::from_str(&text).map_err(|e| bad(&state_path, format!("corrupted: {e}")))?;
    for file in [MODEL, OPTIMIZER] {
        let path = dir.join(file);
        let want = state
            .files
            .get(file)
            .ok_or_else(|| bad(&state_path, format!("no checksum for {file}")))?;
        if !path.is_file() {
            return Err(bad(&path, "missing".into()));
        }
        let got = sha256_file(&path)?;
        if &got != want {
            return Err(bad(
                &path,
                format!("checksum mismatch (truncated or corrupted): sha256 {got}, expected {want}"),
            ));
        }
    }
    let model = candle_core::safetensors::load(dir.join(MODEL), device)?;
    let optimizer = candle_core::safetensors::load(dir.join(OPTIMIZER), device)?;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
    })
}

/// The newest valid checkpoint under `root`. A corrupted newest one is an error, unless
/// `fall_back`, which skips to the previous good one (saying so).
pub fn latest(root: &Path, device: &Device, fall_back: bool) -> Result<Option<LoadedCheckpoint>> {
    for dir in list(root)?.into_iter().rev() {
        match load(&dir, device) {
            Ok(c) => return Ok(Some(c)),
            Err(e) if fall_back => tracing::warn!("skipping a bad checkpoint: {e}"),
            Err(e) => {
                return Err(Error::input(
                    format!("resume from {}", dir.display()),
                    format!("{e}; pass --resume-from-last-good to fall back to the previous good checkpoint"),
                ))
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> PhaseState {
        PhaseState {
            phase: "student".into(),
            step,
            adam_t: step as i32,
            batch_stream_pos: "12345678901234567890".into(),
            router: serde_json::json!({"ema": [1.0]}),
            skipped: 0,
            consecutive_skips: 0,
            losses: vec![2.0, 1.5],
            metrics_len: 99,
            files: BTreeMap::new(),
            early: None,
            stages: Vec::new(),
        }
    }

    fn tensors(v: f32) -> HashMap<String, Tensor> {
        HashMap::from([("w".to_string(), Tensor::new(&[v, 2.0], &Device::Cpu).expect("t"))])
    }

    #[test]
    fn round_trip_keeps_the_newest_and_detects_corruption() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("student");
        for step in [5, 10, 15] {
            write(&root, state(step), &tensors(step as f32), &tensors(0.5), 2).expect("write");
        }
        assert_eq!(list(&root).expect("list").len(), 2, "only the newest two are kept");
        let c = latest(&root, &Device::Cpu, false).expect("latest").expect("some");
        assert_eq!(c.state.step, 15);
        assert_eq!(c.model["w"].to_vec1::<f32>().expect("v"), vec![15.0, 2.0]);
        // Truncate the newest model file: refused, naming the file; fall back on request.
        let f = c.dir.join(MODEL);
        let bytes = fs::read(&f).expect("read");
        fs::write(&f, &bytes[..bytes.len() / 2]).expect("truncate");
        let err = latest(&root, &Device::Cpu, false).err().expect("refused");
        assert!(
            err.to_string().contains("model.safetensors") && err.to_string().contains("checksum"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
        let c = latest(&root, &Device::Cpu, true).expect("fallback").expect("some");
        assert_eq!(c.state.step, 10);
        // No temp directories are left behind.
        let names: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    }
}
