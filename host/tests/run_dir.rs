//! The run-directory rule end to end: retort writes only into an empty directory or one it
//! marked as a run, and a run refused for its config writes nothing.

use std::path::Path;

mod common;
use common::{assert_user_error, retort};

const TINY: &str = concat!(
    r#"
[run]
name = "dir"
[data]
kind = "synthetic"
vocab = 16
train_tokens = 4000
val_tokens = 400
"#,
    tiny_models!()
);

/// Every file under `dir` with its bytes, sorted by path.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("ls") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).expect("rel").display().to_string();
                out.push((rel, std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_directory_of_models_that_is_not_a_run_is_never_written() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("c.toml"), TINY).expect("config");
    let out = d.path().join("models");
    for m in ["teacher", "student"] {
        std::fs::create_dir_all(out.join(m)).expect("mkdir");
        std::fs::write(out.join(m).join("model.safetensors"), format!("{m} weights")).expect("w");
        std::fs::write(out.join(m).join("config.json"), "{}").expect("w");
    }
    std::fs::write(out.join("README"), "my models").expect("w");
    let before = tree(&out);
    for extra in [&[][..], &["--force"][..]] {
        let args = [&["run", "c.toml", "--out", "models", "--quiet"][..], extra].concat();
        let o = retort(&args, d.path());
        assert_user_error(&o, &["models", "not a retort run", "README"]);
        assert!(tree(&out) == before, "a file in the directory changed");
    }
}

#[test]
fn a_refused_config_writes_nothing_and_check_refuses_it_as_run_does() {
    let d = tempfile::tempdir().expect("tmp");
    let bad_kind = format!("{TINY}\n[[observers]]\nkind = \"nope\"\n");
    let bad_key = format!("{TINY}\n[[observers]]\nkind = \"jsonl\"\nfiel = \"m.jsonl\"\n");
    for (config, needle) in [(&bad_kind, "unknown observer kind `nope`"), (&bad_key, "fiel")] {
        std::fs::write(d.path().join("c.toml"), config).expect("config");
        assert_user_error(&retort(&["check", "c.toml"], d.path()), &[needle, "observers[0]"]);
        let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
        assert_user_error(&o, &[needle]);
        assert!(!d.path().join("out").exists(), "a refused run created its directory");
    }
    // The corrected config runs into the same --out.
    std::fs::write(d.path().join("c.toml"), TINY).expect("config");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.path().join("out/run.json").is_file());
}

#[test]
fn an_edited_resolved_config_is_refused_on_resume() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("c.toml"), TINY).expect("config");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg = d.path().join("out/config.resolved.toml");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(&cfg, text.replace("steps = 3", "steps = 4")).expect("edit");
    let o = retort(&["run", "--resume", "out", "--quiet"], d.path());
    assert_user_error(&o, &["config.resolved.toml", "changed after the run started"]);
}

#[test]
fn a_resume_on_changed_data_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let text = TINY.replace(
        "kind = \"synthetic\"\nvocab = 16\ntrain_tokens = 4000\nval_tokens = 400",
        "kind = \"text\"\npath = \"corpus.txt\"",
    );
    std::fs::write(d.path().join("c.toml"), text).expect("config");
    std::fs::write(
        d.path().join("corpus.txt"),
        "to be or not to be, that is the question\n".repeat(30),
    )
    .expect("corpus");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(
        d.path().join("corpus.txt"),
        "to be or not to be, that is the answer!\n".repeat(30),
    )
    .expect("corpus");
    let o = retort(&["run", "--resume", "out", "--quiet"], d.path());
    assert_user_error(&o, &["the data changed since the run started"]);
}

#[test]
fn a_resume_with_a_changed_teacher_checkpoint_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("c.toml"), TINY).expect("config");
    let o = retort(&["run", "c.toml", "--out", "one", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let from_checkpoint = TINY.replace(
        "kind = \"transformer\"\nn_layer = 1\nn_embd = 16\nn_head = 2\ncontext = 8\n[teacher.pretrain]\nsteps = 3\n",
        "kind = \"transformer\"\ncheckpoint = \"one/teacher\"\n",
    );
    assert_ne!(from_checkpoint, TINY);
    std::fs::write(d.path().join("t.toml"), from_checkpoint).expect("config");
    let o = retort(&["run", "t.toml", "--out", "two", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let o = retort(&["run", "--resume", "two", "--quiet"], d.path());
    assert_eq!(
        o.status.code(),
        Some(0),
        "unchanged: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Other weights of the same shapes: the teacher still loads, the resume is refused.
    let weights = d.path().join("one/teacher/model.safetensors");
    let mut bytes = std::fs::read(&weights).expect("weights");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&weights, bytes).expect("edit");
    let o = retort(&["run", "--resume", "two", "--quiet"], d.path());
    assert_user_error(
        &o,
        &["model file one/teacher/model.safetensors changed since the run started"],
    );
}

#[test]
fn a_finished_run_whose_metrics_were_cut_is_refused_on_resume() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("c.toml"), TINY).expect("config");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = d.path().join("out/metrics.jsonl");
    let whole = std::fs::read(&metrics).expect("metrics");
    let o = retort(&["run", "--resume", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let events = |b: &[u8]| String::from_utf8_lossy(b).lines().count();
    assert_eq!(
        events(&std::fs::read(&metrics).expect("metrics")),
        events(&whole),
        "a finished run resumed rewrites its final events, not appends them"
    );

    std::fs::write(&metrics, &whole[..20]).expect("cut inside the first phase's records");
    let before = tree(d.path());
    let o = retort(&["run", "--resume", "out", "--quiet"], d.path());
    assert_user_error(&o, &["metrics.jsonl", "does not begin with"]);
    assert_eq!(tree(d.path()), before, "a refused resume changes nothing");
}
