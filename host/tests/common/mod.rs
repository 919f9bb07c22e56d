//! What the end-to-end tests of the `retort` binary share: running it, and checking a refusal.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

/// The sections after `[data]` of a run that takes a second: a 1-layer teacher pretrained for 3
/// steps, a 1-layer student distilled for 3, one evaluation batch, no baseline. Used as
/// `concat!(HEADER, tiny_models!())`.
#[macro_export]
macro_rules! tiny_models {
    () => {
        r#"[teacher]
kind = "transformer"
n_layer = 1
n_embd = 16
n_head = 2
context = 8
[teacher.pretrain]
steps = 3
[student]
kind = "transformer"
n_layer = 1
n_embd = 8
n_head = 2
context = 8
[train]
steps = 3
batch_size = 2
seq_len = 8
[eval]
batches = 1
batch_size = 2
baseline = false
"#
    };
}

/// `retort args` in `cwd` (without the caller's `RETORT_LOG`).
pub fn retort(args: &[&str], cwd: &Path) -> Output {
    retort_env(args, cwd, &[])
}

/// `retort` with extra environment variables.
pub fn retort_env(args: &[&str], cwd: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retort"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RETORT_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("spawn retort")
}

/// Its stderr, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit code 2, no panic or backtrace, and that stderr contains every needle.
pub fn assert_user_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}
