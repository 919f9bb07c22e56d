//! `retort selftest` as a user runs it: the JSON on stdout with every op family passing, the
//! exit codes, and a CUDA device that does not open refused as a user error saying what this
//! build lacks.

use std::process::{Command, Output};

fn retort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retort"))
        .args(args)
        .env_remove("RETORT_LOG")
        .output()
        .expect("spawn retort")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn selftest_json_on_the_cpu_lists_every_op_family_passing() {
    let o = retort(&["selftest", "--json"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "stderr: {err}");
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["summary"]["failed"], 0);
    let cases = json["cases"].as_array().expect("cases");
    // The families are the op folders of `kernels/` (a unit test of the selftest checks it).
    for family in retort_plugins::kernels::selftest::op_names() {
        assert!(
            cases.iter().any(|c| c["op"] == family && c["status"] == "pass"),
            "{family}: no passing case"
        );
    }
    assert!(err.contains("PASS") && err.contains("[1/"), "stderr: {err}");
}

#[test]
fn selftest_prints_a_table_and_the_verdict() {
    let o = retort(&["selftest", "--filter", "cross_entropy"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("selftest on cpu: PASS"), "{out}");
    assert!(
        out.lines().filter(|l| l.starts_with("cross_entropy")).count() >= 4,
        "{out}"
    );
}

/// Without the CUDA build no CUDA device opens; with it, not on a machine without a GPU, and
/// not `cuda:63` anywhere.
#[test]
fn a_cuda_device_that_does_not_open_is_a_user_error() {
    let (devices, hint): (&[&str], _) = if cfg!(feature = "cuda") {
        let no_gpu = candle_core::Device::new_cuda(0).is_err();
        (if no_gpu { &["cuda", "cuda:63"] } else { &["cuda:63"] }, "nvidia-smi")
    } else {
        (&["cuda", "cuda:1"], "--features cuda")
    };
    for device in devices {
        let o = retort(&["selftest", "--device", device]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "stderr: {err}");
        assert!(err.contains("--device") && err.contains(hint), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = retort(&["selftest", "--device", "tpu"]);
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(&o));
}

#[test]
fn selftest_filter_matching_no_op_is_a_user_error() {
    let o = retort(&["selftest", "--filter", "no-such-op"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("--filter") && err.contains("divergence"), "{err}");
}
