//! Data-parallel training under `mpirun` (feature `mpi`; `scripts/ci_mpi.sh` runs these with
//! Open MPI on loopback): two ranks with half the batch each train what one process does with
//! the whole batch (live and cached teacher), a batch the ranks do not divide is refused, and a
//! killed rank stops the other within a bounded time, after which the run resumes under the same
//! launch to the weights of an uninterrupted one.
#![cfg(feature = "mpi")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use common::{assert_user_error, retort, stderr};

/// Teacher pretrained for 4 steps, student and baseline for 6, two micro-batches of the batch
/// of 4 windows per step (each rank: 2 windows in two micro-batches of 1).
const CONFIG: &str = r#"[run]
name = "dp"
seed = 11
[teacher]
kind = "transformer"
n_layer = 1
n_embd = 16
n_head = 2
context = 8
[teacher.pretrain]
steps = 4
[student]
kind = "transformer"
n_layer = 1
n_embd = 8
n_head = 2
context = 8
[train]
steps = 6
batch_size = 4
grad_accum = 2
seq_len = 8
log_every = 1
checkpoint_every = 2
[eval]
batches = 1
batch_size = 2
[parallel]
check_every = 1
"#;

/// `mpirun -np ranks retort args` in `cwd`, started.
fn spawn_mpirun(ranks: usize, args: &[&str], cwd: &Path) -> Child {
    Command::new("mpirun")
        .args([
            "--oversubscribe",
            "-np",
            &ranks.to_string(),
            env!("CARGO_BIN_EXE_retort"),
        ])
        .args(args)
        .current_dir(cwd)
        .env_remove("RETORT_LOG")
        // CI containers run as root; Open MPI refuses that unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun (Open MPI's launcher) must be installed: scripts/ci_mpi.sh installs it")
}

fn mpirun(ranks: usize, args: &[&str], cwd: &Path) -> Output {
    spawn_mpirun(ranks, args, cwd).wait_with_output().expect("mpirun")
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: {}\n{}", o.status, stderr(o));
}

/// The tensors of a safetensors file, in f64.
fn weights(path: &Path) -> HashMap<String, Tensor> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("safetensors");
    tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F64).expect("f64")))
        .collect()
}

/// `|a - b| / |a|` over every parameter of two exports together.
fn relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    let squares = |t: &Tensor| t.sqr()?.sum_all()?.to_scalar::<f64>();
    let (mut diff, mut norm) = (0.0, 0.0);
    for (name, x) in &a {
        diff += squares(&(x - &b[name]).expect("sub")).expect("sum");
        norm += squares(x).expect("sum");
    }
    (diff / norm).sqrt()
}

/// `(phase, step, loss)` of every train record of a run.
fn losses(run: &Path) -> Vec<(String, u64, f64)> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["event"] == "train")
        .map(|m| {
            let phase = m["phase"].as_str().expect("phase").to_string();
            (
                phase,
                m["step"].as_u64().expect("step"),
                m["loss"].as_f64().expect("loss"),
            )
        })
        .collect()
}

/// The runs in `one` and `two` trained the same models within `1e-6` of their norm (the ranks
/// average gradients summed in another order than one process's, and AdamW's first steps
/// normalise rounding-level gradients, e.g. those of the attention's key bias, whose exact
/// gradient is 0), with the same losses at every step.
fn assert_same_training(one: &Path, two: &Path, phases: &[&str]) {
    for phase in phases {
        let model = |run: &Path| run.join(phase).join("model.safetensors");
        let d = relative_difference(&model(one), &model(two));
        assert!(d < 1e-6, "{phase}: 2 ranks differ from 1 process by {d:e} (relative)");
    }
    let (a, b) = (losses(one), losses(two));
    assert!(
        !a.is_empty() && a.len() == b.len(),
        "train records: {} and {}",
        a.len(),
        b.len()
    );
    for ((phase, step, x), (_, _, y)) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "{phase} step {step}: loss {x} vs {y}");
    }
}

#[test]
fn two_ranks_train_what_one_process_trains_on_the_whole_batch() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("dp.toml"), CONFIG).expect("config");
    let one = retort(&["run", "dp.toml", "--out", "one", "--quiet"], tmp.path());
    assert_eq!(one.status.code(), Some(0), "{}", stderr(&one));
    // check_every = 1: a rank whose parameters differed from rank 0's after any step would
    // have stopped the run, so the ranks stayed bit-identical throughout.
    let two = mpirun(2, &["run", "dp.toml", "--out", "two", "--quiet"], tmp.path());
    assert_ok(&two, "2 ranks");
    assert_same_training(
        &tmp.path().join("one"),
        &tmp.path().join("two"),
        &["teacher", "student", "baseline"],
    );
    // Rank 0 alone printed the report and wrote the run.
    let out = String::from_utf8_lossy(&two.stdout);
    assert_eq!(out.matches("run directory: two").count(), 1, "{out}");
}

/// A cached teacher: each rank reads its windows' top-k from the cache.
#[test]
fn two_ranks_train_from_a_teacher_cache_as_one_process_does() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    std::fs::write(dir.join("dp.toml"), CONFIG).expect("config");
    let teacher = retort(
        &[
            "run",
            "dp.toml",
            "--out",
            "t",
            "--quiet",
            "--set",
            "eval.baseline=false",
        ],
        dir,
    );
    assert_eq!(teacher.status.code(), Some(0), "{}", stderr(&teacher));
    let live = CONFIG
        .replace("[teacher.pretrain]\nsteps = 4\n", "")
        .replace(
            "context = 8\n[student]",
            "context = 8\ncheckpoint = \"t/teacher\"\n[student]",
        )
        .replace("seq_len = 8\n", "seq_len = 8\nwindows = \"aligned\"\n")
        + "[[loss]]\nkind = \"topk_kl\"\nk = 8\nweight = 0.5\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n";
    std::fs::write(dir.join("live.toml"), &live).expect("live");
    let built = retort(&["cache", "live.toml", "--out", "cache", "--k", "8", "--quiet"], dir);
    assert_eq!(built.status.code(), Some(0), "{}", stderr(&built));
    let start = live.find("[teacher]").expect("teacher");
    let end = live.find("[student]").expect("student");
    let cached = format!(
        "{}[teacher]\nkind = \"cached\"\npath = \"cache\"\n{}",
        &live[..start],
        &live[end..]
    );
    std::fs::write(dir.join("cached.toml"), cached).expect("cached");
    let one = retort(&["run", "cached.toml", "--out", "one", "--quiet"], dir);
    assert_eq!(one.status.code(), Some(0), "{}", stderr(&one));
    assert_ok(
        &mpirun(2, &["run", "cached.toml", "--out", "two", "--quiet"], dir),
        "2 ranks, cached",
    );
    assert_same_training(&dir.join("one"), &dir.join("two"), &["student", "baseline"]);
}

#[test]
fn a_batch_the_ranks_do_not_divide_is_refused_before_training() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("dp.toml"), CONFIG).expect("config");
    let o = mpirun(3, &["run", "dp.toml", "--out", "three", "--quiet"], tmp.path());
    assert_user_error(&o, &["train.batch_size", "is 4, not a multiple of the 3 ranks"]);
    assert!(!tmp.path().join("three").exists(), "nothing written");
    // `retort cache` is one process's job.
    let o = mpirun(2, &["cache", "dp.toml", "--out", "c"], tmp.path());
    assert_user_error(&o, &["`retort cache` runs as one process"]);
}

/// The process of rank `rank` among the children of `launcher`.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|b| *b == 0)
                .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
        })
}

/// Waits until `run`'s metrics show a `student` train record at `step` or later.
fn wait_for_step(child: &mut Child, run: &Path, step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !losses(run).iter().any(|(p, s, _)| p == "student" && *s >= step) {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended before step {step}"
        );
        assert!(Instant::now() < deadline, "timed out waiting for step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_rank_stops_the_other_and_the_run_resumes_to_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let config = CONFIG
        .replace("steps = 6\n", "steps = 400\n")
        .replace("checkpoint_every = 2", "checkpoint_every = 25")
        .replace("check_every = 1", "check_every = 10")
        .replace("n_embd = 8", "n_embd = 32");
    std::fs::write(dir.join("dp.toml"), config).expect("config");
    let mut launch = spawn_mpirun(2, &["run", "dp.toml", "--out", "killed", "--quiet"], dir);
    wait_for_step(&mut launch, &dir.join("killed"), 60);
    let victim = rank_pid(launch.id(), 1).expect("rank 1's process");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    let out = launch.wait_with_output().expect("mpirun");
    let waited = killed_at.elapsed();
    assert!(waited < Duration::from_secs(60), "the other rank ran on for {waited:?}");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("error: rank 0 of 2: the launcher ended the job"), "{err}");
    assert!(err.contains("rank 1"), "the launcher names the failed rank: {err}");
    // The checkpoints hold 2 ranks' state: one process may not resume them.
    let single = retort(&["run", "--resume", "killed", "--quiet"], dir);
    assert_user_error(&single, &["written by a run of 2 rank(s), and this run has 1"]);
    assert_ok(&mpirun(2, &["run", "--resume", "killed", "--quiet"], dir), "resume");
    assert_ok(
        &mpirun(2, &["run", "dp.toml", "--out", "whole", "--quiet"], dir),
        "uninterrupted",
    );
    for phase in ["teacher", "student", "baseline"] {
        let model = |run: &str| std::fs::read(dir.join(run).join(phase).join("model.safetensors")).expect("model");
        assert!(model("killed") == model("whole"), "{phase}: resumed weights differ");
    }
}

/// On-policy steps: each rank samples continuations of its rows' prompts (seeds of its own),
/// the ranks still apply identical updates (parameter check at every step), and the steps on
/// samples are recorded.
#[test]
fn on_policy_steps_sample_on_every_rank_and_keep_the_ranks_identical() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = CONFIG.replace(
        "[parallel]",
        "[on_policy]\nlambda = 0.5\nprompt_tokens = 4\ncompare_off_policy = false\n[parallel]",
    );
    std::fs::write(tmp.path().join("op.toml"), config).expect("config");
    assert_ok(
        &mpirun(2, &["run", "op.toml", "--out", "op", "--quiet"], tmp.path()),
        "on-policy, 2 ranks",
    );
    let text = std::fs::read_to_string(tmp.path().join("op/metrics.jsonl")).expect("metrics");
    let sampled: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["event"] == "train" && m["phase"] == "student" && m["on_policy"].is_object())
        .collect();
    // lambda 0.5 over 6 steps: steps 2, 4 and 6 sample, each window up to 8 + 1 - 4 new tokens.
    let steps: Vec<u64> = sampled.iter().map(|m| m["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, vec![2, 4, 6]);
    for m in &sampled {
        assert_eq!(m["on_policy"]["completion_len"].as_f64(), Some(5.0), "{m}");
    }
}

/// Four ranks (2 windows each) through two stages with an EMA, early stopping and evaluations
/// sharded unevenly (5 validation batches over 4 ranks) train and evaluate what one process
/// does.
#[test]
fn four_ranks_through_stages_ema_and_early_stopping_match_one_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = CONFIG
        .replace("steps = 6\nbatch_size = 4\ngrad_accum = 2\n", "steps = 12\nbatch_size = 8\n")
        .replace("checkpoint_every = 2\n", "checkpoint_every = 3\nema_decay = 0.9\neval_every = 2\nearly_stopping = { metric = \"val_loss\", patience = 2 }\n[[stages]]\nname = \"a\"\nsteps = 6\n[[stages]]\nname = \"b\"\nsteps = 6\nlr = 1e-3\n")
        .replace("batches = 1\n", "batches = 5\n");
    std::fs::write(tmp.path().join("rich.toml"), config).expect("config");
    let one = retort(&["run", "rich.toml", "--out", "one", "--quiet"], tmp.path());
    assert_eq!(one.status.code(), Some(0), "{}", stderr(&one));
    assert_ok(
        &mpirun(4, &["run", "rich.toml", "--out", "four", "--quiet"], tmp.path()),
        "4 ranks",
    );
    let (one, four) = (tmp.path().join("one"), tmp.path().join("four"));
    assert_same_training(&one, &four, &["teacher", "student", "baseline"]);
    let evals = |run: &Path| -> Vec<(u64, f64)> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["event"] == "eval")
            .map(|m| {
                (
                    m["step"].as_u64().expect("step"),
                    m["val_loss"].as_f64().expect("val loss"),
                )
            })
            .collect()
    };
    let (a, b) = (evals(&one), evals(&four));
    assert!(!a.is_empty() && a.len() == b.len(), "evaluations: {a:?} vs {b:?}");
    for ((s, x), (t, y)) in a.iter().zip(&b) {
        assert!(
            s == t && (x - y).abs() <= 1e-6 * x.abs(),
            "eval at {s}: {x} vs {t}: {y}"
        );
    }
}
