//! Kill a real `retort run` with SIGKILL mid-training, resume it, and get exactly the weights
//! and metrics of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[run]
name = "resume"
seed = 11

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

[router]
kind = "magnitude"

[train]
steps = 300
batch_size = 8
seq_len = 16
lr = 1e-2
log_every = 1
eval_every = 50
checkpoint_every = 7
keep_checkpoints = 3
ema_decay = 0.9

[eval]
baseline = true
batches = 2
batch_size = 8
"#;

fn retort(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_retort"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn retort")
}

/// Metrics without the fields that measure time (they differ between any two runs).
fn comparable_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json line"))
        .filter(|m| m["event"] != "report")
        .map(|mut m| {
            if let Some(o) = m.as_object_mut() {
                o.remove("elapsed_s");
                o.remove("tokens_per_s");
            }
            m
        })
        .collect()
}

fn model_bytes(dir: &Path, phase: &str) -> Vec<u8> {
    std::fs::read(dir.join(phase).join("model.safetensors")).expect("model")
}

/// Starts a run and SIGKILLs it once `metrics.jsonl` shows `phase` at `step` or later.
fn run_and_kill(cwd: &Path, out: &str, args: &[&str], phase: &str, step: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let metrics = cwd.join(out).join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let reached = std::fs::read_to_string(&metrics).unwrap_or_default().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|m| m["event"] == "train" && m["phase"] == phase && m["step"].as_u64() >= Some(step))
                .unwrap_or(false)
        });
        if reached {
            break;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("the run ended ({status}) before reaching {phase} step {step}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {phase} step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

#[test]
fn killed_runs_resume_to_identical_weights_and_metrics() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("c.toml"), CONFIG).expect("config");
    let o = retort(&["run", "c.toml", "--out", "whole", "--quiet"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));

    // Killed in the student phase, resumed, killed again in the baseline phase, resumed.
    run_and_kill(
        tmp.path(),
        "cut",
        &["run", "c.toml", "--out", "cut", "--quiet"],
        "student",
        40,
    );
    run_and_kill(
        tmp.path(),
        "cut",
        &["run", "--resume", "cut", "--quiet"],
        "baseline",
        100,
    );
    let o = retort(&["run", "--resume", "cut", "--quiet"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));

    let (whole, cut) = (tmp.path().join("whole"), tmp.path().join("cut"));
    for phase in ["teacher", "student", "baseline"] {
        assert!(
            model_bytes(&whole, phase) == model_bytes(&cut, phase),
            "{phase} weights differ after resume"
        );
    }
    let (a, b) = (comparable_metrics(&whole), comparable_metrics(&cut));
    assert_eq!(a.len(), b.len(), "metrics record counts differ");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "metrics differ");
    }
}

#[test]
fn a_corrupted_checkpoint_is_refused_unless_falling_back_is_asked_for() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = CONFIG.replace("baseline = true", "baseline = false");
    std::fs::write(tmp.path().join("c.toml"), &config).expect("config");
    let o = retort(&["run", "c.toml", "--out", "whole", "--quiet"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    run_and_kill(
        tmp.path(),
        "cut",
        &["run", "c.toml", "--out", "cut", "--quiet"],
        "student",
        60,
    );
    // Truncate the newest student checkpoint's weights.
    let root = tmp.path().join("cut/checkpoints/student");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("ls")
        .map(|e| e.expect("e").path())
        .collect();
    dirs.sort();
    let newest = dirs.last().expect("a checkpoint").join("model.safetensors");
    let bytes = std::fs::read(&newest).expect("read");
    std::fs::write(&newest, &bytes[..bytes.len() / 3]).expect("truncate");

    let o = retort(&["run", "--resume", "cut", "--quiet"], tmp.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("model.safetensors") && err.contains("checksum") && err.contains("--resume-from-last-good"),
        "{err}"
    );
    let o = retort(
        &["run", "--resume", "cut", "--resume-from-last-good", "--quiet"],
        tmp.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(model_bytes(&tmp.path().join("whole"), "student") == model_bytes(&tmp.path().join("cut"), "student"));
    assert_eq!(
        comparable_metrics(&tmp.path().join("whole")),
        comparable_metrics(&tmp.path().join("cut"))
    );
}
