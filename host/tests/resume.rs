//! Kill a real `retort run` with SIGKILL mid-training, resume it, and get exactly the weights
//! and metrics of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::retort;

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
                if let Some(p) = o.get_mut("on_policy").and_then(|p| p.as_object_mut()) {
                    p.remove("rollout_tokens_per_s");
                    p.remove("generation_share");
                }
            }
            m
        })
        .collect()
}

fn model_bytes(dir: &Path, phase: &str) -> Vec<u8> {
    std::fs::read(dir.join(phase).join("model.safetensors")).expect("model")
}

/// Starts a run and SIGKILLs it once `metrics.jsonl` shows `phase` at `step` or later (for a
/// new run replacing an old one, once its own `run.json` is in place).
fn run_and_kill(cwd: &Path, out: &str, args: &[&str], phase: &str, step: u64) {
    let mark = cwd.join(out).join("run.json");
    let old_mark = std::fs::read(&mark).ok().filter(|_| !args.contains(&"--resume"));
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
        let replaced = old_mark.is_none() || std::fs::read(&mark).ok() != old_mark;
        let reached = replaced
            && std::fs::read_to_string(&metrics).unwrap_or_default().lines().any(|l| {
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
    killed_run_resumes_identically(CONFIG, &["teacher", "student", "baseline"]);
}

/// An on-policy run (half the steps on the student's samples, two micro-batches a step, the
/// sampling metrics summed over five steps across checkpoints every six), killed and resumed
/// twice, samples what an uninterrupted run samples.
#[test]
fn killed_on_policy_runs_resume_to_identical_weights_and_metrics() {
    let config = CONFIG
        .replace("log_every = 1\n", "log_every = 5\ngrad_accum = 2\n")
        .replace("steps = 300\n", "steps = 150\n")
        .replace("checkpoint_every = 7\n", "checkpoint_every = 6\n")
        + "\n[on_policy]\nlambda = 0.5\nprompt_tokens = 5\ntemperature = 0.9\ntop_k = 12\n";
    assert!(config.contains("grad_accum = 2"));
    killed_run_resumes_identically(&config, &["teacher", "student", "offpolicy", "baseline"]);
}

/// A llama student in bf16 on the CPU (f32 master weights, bf16 products on the AMX tiles):
/// its products reduce in a fixed order, so a killed run resumes to the same weights. Where the
/// CPU has no AMX the mode is refused, and this test checks that instead.
#[test]
fn killed_bf16_student_runs_resume_to_identical_weights_and_metrics() {
    let student = "[student]\nkind = \"transformer\"\nn_layer = 1\nn_embd = 16\n";
    assert!(CONFIG.contains(student));
    let config = CONFIG.replace(
        student,
        "[student]\nkind = \"llama\"\ndtype = \"bf16\"\nn_layer = 1\nn_embd = 32\n",
    );
    if !retort_plugins::kernels::cpu::bf16_matmul::tiles_available() {
        let tmp = tempfile::tempdir().expect("tmp");
        std::fs::write(tmp.path().join("c.toml"), &config).expect("config");
        let o = retort(&["run", "c.toml", "--out", "r", "--quiet"], tmp.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.code() == Some(2) && err.contains("AMX"), "{err}");
        return;
    }
    killed_run_resumes_identically(&config, &["teacher", "student", "baseline"]);
}

/// Runs `config` whole, and again killed in the student phase and in the baseline phase and
/// resumed each time: the weights of every phase and the metrics must be identical.
fn killed_run_resumes_identically(config: &str, phases: &[&str]) {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("c.toml"), config).expect("config");
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
    for phase in phases {
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

/// The entries of `root`, sorted (none when it does not exist).
fn checkpoint_dirs(root: &Path) -> Vec<std::path::PathBuf> {
    if !root.exists() {
        return Vec::new();
    }
    // Hidden entries are what a killed checkpoint write left (a resume tidies them).
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .expect("ls")
        .map(|e| e.expect("e").path())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    dirs.sort();
    dirs
}

/// The `run_id` field of a JSON file (`run.json`, a checkpoint's `state.json`).
fn run_id(file: &Path) -> String {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json");
    v["run_id"].as_str().expect("run_id").to_string()
}

fn every_line_is_json(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    for (i, line) in text.lines().enumerate() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "metrics.jsonl line {} is not JSON: {line}",
            i + 1
        );
    }
}

#[test]
fn force_replaces_the_old_run_whole_and_a_stray_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = CONFIG.replace("baseline = true", "baseline = false");
    std::fs::write(tmp.path().join("c.toml"), &config).expect("config");
    let reseeded = ["--set", "run.seed=12"];
    let whole = [&["run", "c.toml", "--out", "whole", "--quiet"][..], &reseeded].concat();
    let o = retort(&whole, tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));

    // An old run, killed in its student phase with checkpoints on disk.
    run_and_kill(
        tmp.path(),
        "r",
        &["run", "c.toml", "--out", "r", "--quiet"],
        "student",
        40,
    );
    let old = checkpoint_dirs(&tmp.path().join("r/checkpoints/student"))
        .pop()
        .expect("a checkpoint");
    let stray = tmp.path().join("stray");
    std::fs::rename(&old, &stray).expect("keep the old run's newest checkpoint aside");

    // Replaced by another run (another seed), killed early in its student phase.
    let old_id = run_id(&tmp.path().join("r/run.json"));
    let forced = [&["run", "c.toml", "--out", "r", "--force", "--quiet"][..], &reseeded].concat();
    run_and_kill(tmp.path(), "r", &forced, "student", 3);
    assert_ne!(run_id(&tmp.path().join("r/run.json")), old_id);
    for dir in checkpoint_dirs(&tmp.path().join("r/checkpoints/student")) {
        assert_ne!(
            run_id(&dir.join("state.json")),
            old_id,
            "--force left {}",
            dir.display()
        );
    }

    // A checkpoint of the old run put back is refused on resume, naming it.
    let root = tmp.path().join("r/checkpoints/student");
    std::fs::create_dir_all(&root).expect("mkdir");
    let planted = root.join(old.file_name().expect("name"));
    std::fs::rename(&stray, &planted).expect("plant");
    let o = retort(&["run", "--resume", "r", "--quiet"], tmp.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("was written by run"), "{err}");

    std::fs::remove_dir_all(&planted).expect("remove");
    let o = retort(&["run", "--resume", "r", "--quiet"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    every_line_is_json(&tmp.path().join("r"));
    assert!(model_bytes(&tmp.path().join("whole"), "student") == model_bytes(&tmp.path().join("r"), "student"));
    assert_eq!(
        comparable_metrics(&tmp.path().join("whole")),
        comparable_metrics(&tmp.path().join("r"))
    );
}

#[test]
fn a_run_being_written_is_not_resumed_or_replaced_by_a_second_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("c.toml"), CONFIG).expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_retort"))
        .args([
            "run",
            "c.toml",
            "--out",
            "r",
            "--quiet",
            "--set",
            "teacher.pretrain.steps=100000000",
        ])
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !tmp.path().join("r/metrics.jsonl").exists() {
        assert!(child.try_wait().expect("wait").is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "timed out waiting for the run to start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = [
        &["run", "--resume", "r", "--quiet"][..],
        &["run", "c.toml", "--out", "r", "--force", "--quiet"][..],
    ];
    for args in second {
        let o = retort(args, tmp.path());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("another retort process is writing this run"), "{err}");
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    assert!(
        tmp.path().join("r/metrics.jsonl").exists(),
        "the refused second runs deleted nothing"
    );
    let o = retort(&["run", "c.toml", "--out", "r", "--force", "--quiet"], tmp.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "a killed run's lock is released: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `retort run --resume DIR` with the size of any file it writes limited to `limit` bytes
/// (RLIMIT_FSIZE, SIGXFSZ ignored: a write past the limit fails with EFBIG, as on a full disk).
fn resume_with_file_size_limit(cwd: &Path, dir: &str, limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retort"));
    cmd.args(["run", "--resume", dir, "--quiet"]).current_dir(cwd);
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec the closure calls only the async-signal-safe `signal` and
    // `setrlimit`, touching no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("spawn retort")
}

fn snapshot(dirs: &[std::path::PathBuf]) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    dirs.iter()
        .flat_map(|d| checkpoint_dirs(d))
        .map(|f| {
            let bytes = std::fs::read(&f).expect("read");
            (f, bytes)
        })
        .collect()
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_exits_1() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = CONFIG
        .replace("baseline = true", "baseline = false")
        .replace("n_layer = 1\nn_embd = 16", "n_layer = 1\nn_embd = 64");
    std::fs::write(tmp.path().join("c.toml"), &config).expect("config");
    run_and_kill(
        tmp.path(),
        "r",
        &["run", "c.toml", "--out", "r", "--quiet"],
        "student",
        40,
    );
    let root = tmp.path().join("r/checkpoints/student");
    let before_dirs = checkpoint_dirs(&root);
    let before = snapshot(&before_dirs);
    let largest = before.iter().map(|(_, b)| b.len() as u64).max().expect("files");
    let metrics = std::fs::metadata(tmp.path().join("r/metrics.jsonl"))
        .expect("metrics")
        .len();
    let limit = largest - 1;
    assert!(
        metrics * 2 < limit,
        "the test needs checkpoint files larger than the log: {metrics} vs {limit}"
    );

    let o = resume_with_file_size_limit(tmp.path(), "r", limit);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpoints/student") && !err.contains("panicked"),
        "{err}"
    );
    assert_eq!(checkpoint_dirs(&root), before_dirs, "the checkpoints on disk changed");
    assert!(snapshot(&before_dirs) == before, "a previous checkpoint was altered");

    // The previous checkpoint is whole: the run resumes from it.
    let o = retort(&["run", "--resume", "r", "--quiet"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    every_line_is_json(&tmp.path().join("r"));
}
