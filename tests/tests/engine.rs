//! The training engine: parameter groups (freezing), gradient accumulation, non-finite guard.

use std::path::Path;

use candle_core::{Device, Tensor};
use retort_core::registry::{no_params, Factory};
use retort_core::{BuildContext, Error, LossTerm, Params, Registry, Result, StepContext};
use retort_host::assemble::config;
use retort_host::assemble::{seeds, Pipeline};
use retort_host::engine::run::RunOutcome;
use retort_plugins::losses::ce::cross_entropy;
use retort_tests::{max_abs_diff, read_metrics, run_in, tiny_config};

fn run_with(registry: &Registry, dir: &Path, toml: &str, sets: &[&str]) -> Result<RunOutcome> {
    run_in(registry, dir, toml, sets, false)
}

fn weights(dir: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("run/student/model.safetensors"), &Device::Cpu).expect("student weights")
}

#[test]
fn gradient_accumulation_matches_the_large_batch() {
    accumulation_matches_the_large_batch(&tiny_config("accum"));
}

/// The llama student's linear layers and tied embedding write their gradients into the
/// optimizer's buffers in place: summed over micro-batches there, on the fused LM-head path
/// (the default, here in chunks of 24 tokens) and on the full-logits path.
#[test]
fn gradient_accumulation_matches_the_large_batch_for_a_llama_student() {
    let llama = tiny_config("accum-llama").replace("[student]\nkind = \"transformer\"", "[student]\nkind = \"llama\"");
    assert!(llama.contains("kind = \"llama\""));
    accumulation_matches_the_large_batch(&llama.replace("[train]\n", "[train]\nlm_head = { chunk_tokens = 24 }\n"));
    accumulation_matches_the_large_batch(&llama.replace("[train]\n", "[train]\nlm_head = { fused = false }\n"));
}

fn accumulation_matches_the_large_batch(toml: &str) {
    let registry = retort_host::builtin_registry().expect("registry");
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let common = ["train.steps=12", "teacher.pretrain.steps=12", "eval.baseline=false"];
    let large: Vec<&str> = common
        .iter()
        .copied()
        .chain(["train.batch_size=8", "train.grad_accum=1"])
        .collect();
    let micro: Vec<&str> = common
        .iter()
        .copied()
        .chain(["train.batch_size=4", "train.grad_accum=2"])
        .collect();
    let ra = run_with(&registry, a.path(), toml, &large).expect("large batch");
    let rb = run_with(&registry, b.path(), toml, &micro).expect("micro batches");
    assert_eq!(ra.report.train.tokens, rb.report.train.tokens);
    let (wa, wb) = (weights(a.path()), weights(b.path()));
    let mut worst = 0f32;
    for (name, t) in &wa {
        worst = worst.max(max_abs_diff(t, &wb[name]));
    }
    // Same windows, gradients summed in another order: equal up to float error.
    assert!(worst < 1e-4, "max weight difference {worst}");
    assert!((ra.report.student.val_loss - rb.report.student.val_loss).abs() < 1e-4);
}

#[test]
fn a_frozen_group_stays_bit_identical() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = tiny_config("frozen").replace(
        "[train]\n",
        "[train]\nparam_groups = [{ pattern = 'transformer\\.wte\\.weight', lr_mult = 0.0 }, { pattern = 'transformer\\.h\\.0\\..*', lr_mult = 0.5 }]\n",
    );
    let out = run_with(&registry, tmp.path(), &toml, &["eval.baseline=false"]).expect("run");
    let trained = weights(tmp.path());
    // The same init, rebuilt from the seed.
    let (cfg, _) = config::load(
        Some(&tmp.path().join("config.toml")),
        &["eval.baseline=false".to_string()],
    )
    .expect("cfg");
    let seed = cfg.run.seed;
    let pipeline = Pipeline::assemble(cfg, &registry).expect("assemble");
    let init = pipeline.build_student(seeds::student_init(seed)).expect("student");
    for (name, var) in init.vars() {
        let diff = max_abs_diff(var.as_tensor(), &trained[&name]);
        if name == "transformer.wte.weight" {
            assert_eq!(diff, 0.0, "frozen {name} changed");
        } else if name.ends_with(".weight") && name.contains("c_attn") {
            assert!(diff > 0.0, "{name} did not train");
        }
    }
    // The groups are logged with their sizes.
    let metrics = read_metrics(&out.dir);
    let table = metrics
        .iter()
        .find(|m| m["event"] == "param_groups" && m["phase"] == "student")
        .expect("group table");
    let groups = table["groups"].as_array().expect("groups");
    assert_eq!(groups[0]["tensors"], 1);
    assert_eq!(groups[0]["lr_mult"], 0.0);
    assert_eq!(groups[1]["tensors"], 12, "one block has 12 tensors");
    let rec = metrics
        .iter()
        .find(|m| m["event"] == "train" && m["phase"] == "student")
        .expect("train record");
    assert_eq!(rec["grad_norm_groups"]["transformer\\.wte\\.weight"], 0.0);
    assert!(rec["grad_norm_groups"]["default"].as_f64().expect("norm") > 0.0);
}

/// A loss that is `ce` except at the steps listed, where it is NaN.
struct NanAt {
    steps: Vec<usize>,
}

impl LossTerm for NanAt {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let ce = cross_entropy(&ctx.student.logits, &ctx.batch.targets, None, 0.0)?;
        Ok(
            if self.steps.contains(&ctx.progress.step) || self.steps.contains(&usize::MAX) {
                (ce * f64::NAN)?
            } else {
                ce
            },
        )
    }
    fn needs_teacher(&self) -> bool {
        false
    }
}

fn build_nan_once(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(NanAt { steps: vec![3] }))
}
fn build_nan_always(_: &Params, _: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(NanAt {
        steps: vec![usize::MAX],
    }))
}

fn nan_registry() -> Registry {
    let mut r = retort_host::builtin_registry().expect("registry");
    r.losses
        .register(
            &Factory {
                kind: "nan_once",
                description: "NaN at step 3",
                build: build_nan_once,
                params: no_params,
            },
            "test",
        )
        .expect("register");
    r.losses
        .register(
            &Factory {
                kind: "nan_always",
                description: "always NaN",
                build: build_nan_always,
                params: no_params,
            },
            "test",
        )
        .expect("register");
    r
}

fn nan_config(kind: &str) -> String {
    tiny_config("nan").replace(
        "[[loss]]\nkind = \"kl\"\nweight = 0.5\ntemperature = 2.0\n\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n",
        &format!("[[loss]]\nkind = \"{kind}\"\n"),
    ) + "\n"
}

#[test]
fn a_non_finite_step_is_skipped_without_touching_the_weights() {
    let registry = nan_registry();
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let sets = |steps: &'static str| {
        vec![
            steps,
            "eval.baseline=false",
            "train.lr_schedule={ kind = \"constant\" }",
        ]
    };
    // Three clean steps, against four steps whose fourth (index 3) is NaN and must change nothing
    // (the optimizer is not called for a skipped step, so its state is untouched as well).
    run_with(&registry, a.path(), &nan_config("nan_once"), &sets("train.steps=3")).expect("3 steps");
    let rb = run_with(&registry, b.path(), &nan_config("nan_once"), &sets("train.steps=4")).expect("4 steps");
    let (wa, wb) = (weights(a.path()), weights(b.path()));
    for (name, t) in &wa {
        assert_eq!(max_abs_diff(t, &wb[name]), 0.0, "{name} changed in a skipped step");
    }
    assert_eq!(rb.report.train.skipped_steps, 1);
    let skip = read_metrics(&rb.dir)
        .into_iter()
        .find(|m| m["event"] == "skip")
        .expect("skip record");
    assert_eq!(skip["step"], 4);
    assert!(skip["cause"].as_str().expect("cause").contains("nan_once"), "{skip}");
}

#[test]
fn too_many_consecutive_skips_stop_the_run_with_a_runtime_error() {
    let registry = nan_registry();
    let tmp = tempfile::tempdir().expect("tmp");
    let err = run_with(
        &registry,
        tmp.path(),
        &nan_config("nan_always"),
        &["eval.baseline=false", "train.max_consecutive_skips=2"],
    )
    .err()
    .expect("must stop");
    assert!(matches!(err, Error::Runtime(_)), "{err}");
    assert_eq!(err.exit_code(), 1);
    let msg = err.to_string();
    assert!(
        msg.contains("3 consecutive steps skipped") && msg.contains("nan_always"),
        "{msg}"
    );
}

#[test]
fn ema_weights_are_exported_and_decay_zero_is_the_raw_weights() {
    let registry = retort_host::builtin_registry().expect("registry");
    let (off, zero, avg) = (
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
        tempfile::tempdir().expect("tmp"),
    );
    let base = ["eval.baseline=false", "train.steps=20", "teacher.pretrain.steps=20"];
    let with = |extra: &'static str| -> Vec<&str> { base.iter().copied().chain([extra]).collect() };
    let r_off = run_with(&registry, off.path(), &tiny_config("ema"), &base).expect("off");
    run_with(
        &registry,
        zero.path(),
        &tiny_config("ema"),
        &with("train.ema_decay=0.0"),
    )
    .expect("decay 0");
    let r_avg = run_with(&registry, avg.path(), &tiny_config("ema"), &with("train.ema_decay=0.9")).expect("decay 0.9");
    // Decay 0: the average is the last weights, bit for bit.
    let (w_off, w_zero, w_avg) = (weights(off.path()), weights(zero.path()), weights(avg.path()));
    for (name, t) in &w_off {
        assert_eq!(max_abs_diff(t, &w_zero[name]), 0.0, "{name}");
    }
    // Decay 0.9: different exported weights, and the report evaluates them.
    let moved: f32 = w_off
        .iter()
        .map(|(n, t)| max_abs_diff(t, &w_avg[n]))
        .fold(0.0, f32::max);
    assert!(moved > 0.0);
    assert_ne!(r_off.report.student.val_loss, r_avg.report.student.val_loss);
    assert!(r_avg.report.student.val_loss.is_finite());
    let err = run_with(&registry, off.path(), &tiny_config("ema"), &with("train.ema_decay=1.0"))
        .err()
        .expect("bad decay");
    assert!(err.to_string().contains("train.ema_decay"), "{err}");
}

#[test]
fn a_half_precision_teacher_distills_and_a_half_precision_student_is_refused() {
    let registry = retort_host::builtin_registry().expect("registry");
    let (full, half) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let base = ["eval.baseline=false", "train.steps=10", "teacher.pretrain.steps=30"];
    let r32 = run_with(&registry, full.path(), &tiny_config("p32"), &base).expect("f32 teacher");
    for precision in ["bf16", "f16"] {
        let set = format!("teacher.precision=\"{precision}\"");
        let sets: Vec<&str> = base.iter().copied().chain([set.as_str()]).collect();
        let dir = half.path().join(precision);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let r = run_with(&registry, &dir, &tiny_config("half"), &sets).expect("half teacher");
        // The same pretrained weights (pretraining is f32), evaluated in half precision.
        let (a, b) = (r32.report.teacher.val_loss, r.report.teacher.val_loss);
        assert!(
            (a - b).abs() < 2e-2 && a != b,
            "{precision}: teacher val loss {b} vs f32 {a}"
        );
        assert!(r.report.student.val_loss.is_finite());
        assert!(r.report.teacher.description.contains("transformer"));
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let err = run_with(
        &registry,
        tmp.path(),
        &tiny_config("bad"),
        &["student.dtype=\"bf16\"", "eval.baseline=false"],
    )
    .err()
    .expect("refused");
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("student.dtype") && err.to_string().contains("only for llama students"),
        "{err}"
    );
}

#[test]
fn a_dynamic_loss_scale_changes_nothing_in_f32_and_is_recorded() {
    let registry = retort_host::builtin_registry().expect("registry");
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let base = ["train.steps=12", "teacher.pretrain.steps=12", "eval.baseline=false"];
    let scaled: Vec<&str> = base.iter().copied().chain(["train.loss_scale=\"dynamic\""]).collect();
    let ra = run_with(&registry, a.path(), &tiny_config("plain"), &base).expect("unscaled");
    let rb = run_with(&registry, b.path(), &tiny_config("plain"), &scaled).expect("scaled");
    // The loss times 2^16, the gradients divided by it: exact in f32, so the same weights.
    let (wa, wb) = (weights(a.path()), weights(b.path()));
    for (name, t) in &wa {
        assert_eq!(max_abs_diff(t, &wb[name]), 0.0, "{name} differs");
    }
    assert_eq!(ra.report.student.val_loss, rb.report.student.val_loss);
    let scales: Vec<f64> = read_metrics(&b.path().join("run"))
        .iter()
        .filter(|m| m["event"] == "train")
        .filter_map(|m| m["scalars"]["loss_scale"].as_f64())
        .collect();
    assert!(
        !scales.is_empty() && scales.iter().all(|s| *s == 65_536.0),
        "{scales:?}"
    );
    let unscaled = read_metrics(&a.path().join("run"));
    assert!(unscaled.iter().all(|m| m["scalars"].get("loss_scale").is_none()));
}
