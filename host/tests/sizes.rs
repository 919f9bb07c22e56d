//! Sizes that cannot fit are refused at assembly with the key and the estimate, before any
//! allocation could abort the process; `check` prints the estimate.

use std::process::Output;

mod common;
use common::retort;

fn assert_refused(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

#[test]
fn absurd_models_and_batches_are_refused_with_their_key() {
    let d = tempfile::tempdir().expect("tmp");
    for command in ["check", "run"] {
        let o = retort(
            &[command, "--set", "student.n_embd=1000000", "--set", "run.name=x"],
            d.path(),
        );
        assert_refused(
            &o,
            &["`student`", "more than this host has in all", "--set student.n_embd"],
        );
        let o = retort(
            &[
                command,
                "--set",
                "teacher.n_layer=100000",
                "--set",
                "teacher.n_embd=8192",
            ],
            d.path(),
        );
        assert_refused(&o, &["`teacher`"]);
        let o = retort(&[command, "--set", "train.batch_size=100000000"], d.path());
        assert_refused(&o, &["`train.batch_size`", "activations"]);
    }
    assert!(!d.path().join("runs").exists(), "a refused run wrote its directory");
}

#[test]
fn check_prints_the_memory_estimate() {
    let d = tempfile::tempdir().expect("tmp");
    let o = retort(&["check"], d.path());
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("memory:"))
        .expect("a memory line");
    assert!(
        line.contains("at peak") && line.contains("AdamW") && line.contains("free of"),
        "{line}"
    );
}
