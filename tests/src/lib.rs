//! Helpers for retort's end-to-end tests.

use std::path::{Path, PathBuf};

/// `../shared` beside the checkout (the workspace root's parent).
pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The Tiny Shakespeare corpus, or `None` when absent outside CI.
///
/// # Panics
/// When `CI=true` and the file is missing: in CI the data is always present, so a missing
/// file is a broken setup, not a reason to skip.
pub fn tinyshakespeare() -> Option<PathBuf> {
    let p = shared_dir().join("data/tinyshakespeare.txt");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {} is missing", p.display());
    }
    eprintln!("skipping: {} is missing (outside CI)", p.display());
    None
}

/// A tiny but complete run config: a 2-layer teacher pretrained on a synthetic stream and a
/// 1-layer student, a few dozen steps each.
pub fn tiny_config(name: &str) -> String {
    format!(
        r#"
[run]
name = "{name}"
seed = 7

[data]
kind = "synthetic"
vocab = 16
train_tokens = 20000
val_tokens = 2000

[teacher]
kind = "transformer"
n_layer = 2
n_embd = 32
n_head = 2
context = 16

[teacher.pretrain]
steps = 60
lr = 1e-2

[student]
kind = "transformer"
n_layer = 1
n_embd = 16
n_head = 2
context = 16

[[loss]]
kind = "kl"
weight = 0.5
temperature = 2.0

[[loss]]
kind = "ce"
weight = 0.5

[train]
steps = 40
batch_size = 8
seq_len = 16
lr = 1e-2
log_every = 5
eval_every = 20

[eval]
baseline = true
batches = 4
batch_size = 8
"#
    )
}

/// Reads `metrics.jsonl` as JSON values.
pub fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// Writes `toml` as `dir/config.toml`, applies `sets`, assembles with `registry` and runs into
/// `dir/run` (continuing the run there when `resume`).
pub fn run_in(
    registry: &retort_core::Registry,
    dir: &Path,
    toml: &str,
    sets: &[&str],
    resume: bool,
) -> retort_core::Result<retort_host::engine::run::RunOutcome> {
    let cfg_path = dir.join("config.toml");
    std::fs::write(&cfg_path, toml).expect("write config");
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (cfg, origin) = retort_host::assemble::config::load(Some(&cfg_path), &sets)?;
    let pipeline = retort_host::assemble::Pipeline::assemble(cfg, registry)?;
    retort_host::engine::run::run(
        pipeline,
        &origin,
        &retort_host::engine::run::RunOptions {
            out: Some(dir.join("run")),
            resume: resume.then(|| dir.join("run")),
            ..Default::default()
        },
    )
}

/// Largest absolute elementwise difference of two f32 tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}
