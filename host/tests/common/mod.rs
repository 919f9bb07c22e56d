//! What the end-to-end tests of the `retort` binary share: running it, and checking a refusal.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;
use std::process::{Command, Output};

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
