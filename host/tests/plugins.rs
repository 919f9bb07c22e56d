//! Dynamic plugins through the binary: the example loss and router load from config and change
//! the run; every loading error exits 2 with a message naming the library and the problem; a
//! scaffolded loss, loaded in-process, reduces like the built-ins (padding, token weights).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::{Batch, BuildContext, Outputs, Params, Progress, Registry, StepContext};

/// Builds the example plugins and the fixtures (no-op when up to date); returns their directory.
fn plugin_dir() -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_retort"));
    let target = exe.parent().and_then(Path::parent).expect("target dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "retort-plugin-loss",
            "-p",
            "retort-plugin-router",
        ])
        .args([
            "-p",
            "retort-fixture-clash",
            "-p",
            "retort-fixture-mismatch",
            "--target-dir",
        ])
        .arg(target)
        // A plugin must be built with the host's features (its ABI fingerprint names them).
        .args(if cfg!(feature = "cuda") {
            &["--features", "retort-sdk/cuda"][..]
        } else {
            &[]
        })
        .current_dir(&root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the plugins failed");
    target.join("debug")
}

fn lib(dir: &Path, name: &str) -> PathBuf {
    let file = format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let p = dir.join(file);
    assert!(p.is_file(), "{} missing", p.display());
    p
}

fn retort(args: &[&str], cwd: &Path, plugin_env: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_retort"));
    c.args(args).current_dir(cwd).env_remove("RETORT_PLUGIN_PATH");
    if let Some(v) = plugin_env {
        c.env("RETORT_PLUGIN_PATH", v);
    }
    c.output().expect("spawn retort")
}

fn assert_user_error(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
}

fn config(paths: &[&Path], loss_and_router: &str) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
    format!(
        r#"
[plugins]
paths = [{}]

[run]
name = "plugins"
seed = 3

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
steps = 40
lr = 1e-2

[student]
kind = "transformer"
n_layer = 1
n_embd = 16
n_head = 2
context = 16

{loss_and_router}

[train]
steps = 30
batch_size = 8
seq_len = 16
lr = 1e-2
log_every = 5

[eval]
baseline = false
batches = 2
batch_size = 8
"#,
        list.join(", ")
    )
}

const PLUGIN_OBJECTIVE: &str = r#"
[[loss]]
kind = "confidence_kl"
weight = 0.5
temperature = 2.0

[[loss]]
kind = "ce"
weight = 0.5

[router]
kind = "dwa"
temperature = 1.0
decay = 0.5
"#;

#[test]
fn example_loss_and_router_load_from_config_and_drive_the_run() {
    let dir = plugin_dir();
    let (loss, router) = (lib(&dir, "retort_plugin_loss"), lib(&dir, "retort_plugin_router"));
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::write(tmp.path().join("c.toml"), config(&[&loss, &router], PLUGIN_OBJECTIVE)).expect("write");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], tmp.path(), None);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(tmp.path().join("out/metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .filter(|m: &serde_json::Value| m["event"] == "train" && m["phase"] == "student")
        .collect();
    let (first, last) = (metrics.first().expect("first"), metrics.last().expect("last"));
    // The plugin loss is computed and falls.
    let (c0, c1) = (
        first["terms"]["confidence_kl"].as_f64().expect("c"),
        last["terms"]["confidence_kl"].as_f64().expect("c"),
    );
    assert!(c1 < c0, "confidence_kl {c0} -> {c1}");
    // The plugin router moved the weights off the configured 0.5 / 0.5 and logged its rates.
    let w = &last["weights"];
    let (wk, wc) = (w["confidence_kl"].as_f64().expect("w"), w["ce"].as_f64().expect("w"));
    assert!((wk - 0.5).abs() > 1e-6 && (wk + wc - 1.0).abs() < 1e-9, "{w}");
    assert!(last["router"]["rate.confidence_kl"].is_number(), "{last}");
    // `retort plugins CONFIG` shows where each came from.
    let o = retort(&["plugins", "c.toml", "--json"], tmp.path(), None);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let dwa = list
        .as_array()
        .expect("array")
        .iter()
        .find(|e| e["kind"] == "dwa")
        .expect("dwa listed");
    assert_eq!(dwa["category"], "router");
    assert_eq!(dwa["source"], router.display().to_string());
    assert_eq!(dwa["params"]["properties"]["temperature"]["default"], 2.0, "{dwa}");
}

#[test]
fn plugin_path_env_accepts_files_and_directories() {
    let dir = plugin_dir();
    let tmp = tempfile::tempdir().expect("tmp");
    let only = tmp.path().join("libs");
    std::fs::create_dir(&only).expect("mkdir");
    std::fs::copy(lib(&dir, "retort_plugin_router"), only.join("librouter.so")).expect("copy");
    std::fs::write(only.join("README.txt"), "not a library, skipped").expect("write");
    let env = format!("{}:{}", lib(&dir, "retort_plugin_loss").display(), only.display());
    let o = retort(&["plugins"], tmp.path(), Some(&env));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("confidence_kl") && out.contains("dwa"), "{out}");
}

#[test]
fn loading_errors_exit_2_and_name_the_library() {
    let dir = plugin_dir();
    let tmp = tempfile::tempdir().expect("tmp");
    let objective = "[[loss]]\nkind = \"ce\"\n";
    let check = |paths: &[&Path]| {
        std::fs::write(tmp.path().join("c.toml"), config(paths, objective)).expect("write");
        retort(&["check", "c.toml"], tmp.path(), None)
    };
    // Missing file.
    let missing = tmp.path().join("nope.so");
    assert_user_error(&check(&[&missing]), &["nope.so", "plugins.paths[0]", "file not found"]);
    // Not a shared library.
    let text = tmp.path().join("fake.so");
    std::fs::write(&text, "not an ELF file").expect("write");
    assert_user_error(&check(&[&text]), &["fake.so", "not a loadable shared library"]);
    // A shared library that is not a retort plugin.
    let libm = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file())
    .expect("a system libm to use as a non-plugin shared library");
    assert_user_error(&check(&[libm]), &["not a retort plugin", "retort_plugin_fingerprint"]);
    // ABI fingerprint mismatch: names the field and both values, never calls register.
    let mismatch = lib(&dir, "retort_fixture_mismatch");
    assert_user_error(
        &check(&[&mismatch]),
        &["different retort ABI", "rustc is `rustc 1.0.0", "in this retort"],
    );
    // A kind that clashes with a built-in.
    let clash = lib(&dir, "retort_fixture_clash");
    assert_user_error(
        &check(&[&clash]),
        &["duplicate loss kind `kl`", "built-in", "libretort_fixture_clash"],
    );
    // A kind that clashes with another plugin.
    let loss = lib(&dir, "retort_plugin_loss");
    let copy = tmp.path().join("libcopy_of_loss.so");
    std::fs::copy(&loss, &copy).expect("copy");
    assert_user_error(
        &check(&[&loss, &copy]),
        &[
            "duplicate loss kind `confidence_kl`",
            "libretort_plugin_loss",
            "libcopy_of_loss.so",
        ],
    );
}

/// Scaffolds the plugin `name` of `kind` with `retort new-plugin` into `dir` and builds it
/// without edits; returns the library.
fn scaffold(dir: &Path, name: &str, kind: &str) -> PathBuf {
    let exe = Path::new(env!("CARGO_BIN_EXE_retort"));
    let target = exe.parent().and_then(Path::parent).expect("target dir");
    let o = retort(&["new-plugin", name, "--kind", kind, "--dir", "."], dir, None);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let root = dir.join(name);
    for f in ["Cargo.toml", "src/lib.rs", "README.md"] {
        assert!(root.join(f).is_file(), "{name}/{f} missing");
    }
    // Offline and quick: the workspace's lock file and target directory (shared dependencies).
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"),
        root.join("Cargo.lock"),
    )
    .expect("lock");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--offline", "--target-dir"])
        .arg(target)
        .current_dir(&root)
        .status()
        .expect("cargo build");
    assert!(status.success(), "the scaffolded {name} does not build");
    lib(&target.join("debug"), &name.replace('-', "_"))
}

#[test]
fn scaffolded_plugins_build_and_load_without_edits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let libs =
        [("scaffold-loss", "loss"), ("scaffold-router", "router")].map(|(name, kind)| scaffold(tmp.path(), name, kind));
    // A second scaffold into the same place is refused and leaves the first untouched.
    let before = std::fs::read(tmp.path().join("scaffold-loss/src/lib.rs")).expect("lib.rs");
    let o = retort(&["new-plugin", "scaffold-loss", "--kind", "loss"], tmp.path(), None);
    assert_user_error(&o, &["already exists"]);
    assert_eq!(
        std::fs::read(tmp.path().join("scaffold-loss/src/lib.rs")).expect("lib.rs"),
        before
    );
    // Both load and run.
    let objective = "[[loss]]\nkind = \"scaffold_loss\"\nweight = 0.5\ntemperature = 2.0\n\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n\n[router]\nkind = \"scaffold_router\"\nscale = 0.5\n";
    let libs: Vec<&Path> = libs.iter().map(PathBuf::as_path).collect();
    std::fs::write(tmp.path().join("c.toml"), config(&libs, objective)).expect("write");
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], tmp.path(), None);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let last: serde_json::Value = std::fs::read_to_string(tmp.path().join("out/metrics.jsonl"))
        .expect("metrics")
        .lines()
        .rfind(|l| l.contains("\"phase\":\"student\"") && l.contains("\"event\":\"train\""))
        .map(|l| serde_json::from_str(l).expect("json"))
        .expect("a student record");
    assert!(last["terms"]["scaffold_loss"].is_number(), "{last}");
    assert_eq!(last["weights"]["ce"], 0.25, "{last}");
    assert_eq!(last["router"]["steps"], 30.0);
}

/// `(value, d value / d student logits)` of the loss `kind` built with `params` from `registry`,
/// on a step with `student`/`teacher` logits, a padding mask and router token weights.
fn value_and_grad(
    registry: &Registry,
    kind: &str,
    params: serde_json::Value,
    batch: &Batch,
    logits: (&Var, &Tensor),
    token_weights: &Tensor,
) -> (f64, Vec<f32>) {
    let ctx = BuildContext::new(registry, Device::Cpu, 0);
    let params = Params::new("loss[0]", params.as_object().expect("object").clone());
    let term = registry.losses.build(kind, &params, &ctx).expect("build");
    let (student, teacher) = (
        Outputs::logits_only(logits.0.as_tensor().clone()),
        Outputs::logits_only(logits.1.clone()),
    );
    let step = StepContext {
        batch,
        student: &student,
        teacher: Some(&teacher),
        progress: Progress::new(0, 1),
        token_weights: Some(token_weights),
    };
    let value = term.compute(&step).expect("compute");
    let grad = value.backward().expect("backward");
    let grad = grad
        .get(logits.0.as_tensor())
        .expect("a gradient for the student logits");
    (
        value
            .to_dtype(DType::F64)
            .and_then(|v| v.to_scalar::<f64>())
            .expect("scalar"),
        grad.flatten_all().and_then(|g| g.to_vec1::<f32>()).expect("grad"),
    )
}

/// Uniform random values in `[lo, hi)` of `shape`, seeded.
fn uniform(rng: &mut ChaCha8Rng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

#[test]
fn scaffolded_loss_honours_padding_and_token_weights_like_the_builtin_kl() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = scaffold(tmp.path(), "scaffold-kl", "loss");
    let mut registry = retort_host::builtin_registry().expect("built-ins");
    retort_host::assemble::plugin_loader::load_plugin(&mut registry, &path, "test").expect("load the scaffolded loss");
    // Random logits [2, 5, V]; the second row has two padding tokens; the router weighs tokens.
    let (b, t, v) = (2, 5, 11);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let zs = Var::from_tensor(&uniform(&mut rng, &[b, t, v], -3.0, 3.0)).expect("var");
    let zt = uniform(&mut rng, &[b, t, v], -3.0, 3.0);
    let weights = uniform(&mut rng, &[b, t], 0.2, 2.0);
    let mask = Tensor::new(&[[1.0f32, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0]], &Device::Cpu).expect("mask");
    let ids = Tensor::zeros((b, t), DType::U32, &Device::Cpu).expect("ids");
    let batch = Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: Some(mask),
        source: None,
    };
    let params = serde_json::json!({"temperature": 2.0});
    let run = |kind| value_and_grad(&registry, kind, params.clone(), &batch, (&zs, &zt), &weights);
    let ((got, got_grad), (want, want_grad)) = (run("scaffold_kl"), run("kl"));
    // Same formula: T^2 * sum_i w_i KL_i / sum_i w_i with w = mask * token weights.
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "scaffold_kl {got} vs kl {want}"
    );
    let scale = want_grad.iter().fold(0f32, |m, g| m.max(g.abs()));
    for (i, (g, w)) in got_grad.iter().zip(&want_grad).enumerate() {
        assert!((g - w).abs() <= 1e-6 * scale, "d/dz_s[{i}]: scaffold_kl {g} vs kl {w}");
    }
    // Padded tokens get no gradient.
    let padded = &got_grad[(b * t - 2) * v..];
    assert!(padded.iter().all(|g| *g == 0.0), "{padded:?}");
}
