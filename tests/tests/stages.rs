//! Multi-stage runs and early stopping: what each stage trains, the boundary checkpoint, resume
//! across and inside stages, and the best weights kept and exported.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use retort_core::Error;
use retort_host::assemble::config;
use retort_host::assemble::{seeds, Pipeline};
use retort_tests::{max_abs_diff, read_metrics, run_in, tiny_config};

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("safetensors")
}

/// Stage 1 trains only embeddings and head (the blocks are frozen) on KL alone; stage 2 trains
/// everything at a lower learning rate on KL + CE.
fn two_stage_config() -> String {
    tiny_config("stages")
        + r#"
[[stages]]
name = "embeddings"
steps = 15
param_groups = [{ pattern = 'transformer\.h\..*', lr_mult = 0.0 }]
loss_weights = { ce = 0.0, kl = 1.0 }

[[stages]]
name = "all"
steps = 10
lr = 3e-3
lr_schedule = { kind = "constant" }
"#
}

const COMMON: [&str; 3] = [
    "train.checkpoint_every=0",
    "train.keep_checkpoints=10",
    "teacher.pretrain.steps=20",
];

#[test]
fn each_stage_trains_what_it_says_and_leaves_a_boundary_checkpoint() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let out = run_in(&registry, tmp.path(), &two_stage_config(), &COMMON, false).expect("run");
    let run_dir = &out.dir;

    // The budget is the sum of the stages, for the student and the baseline alike.
    assert_eq!(out.report.train.steps, 25);
    assert_eq!(
        out.report
            .baseline
            .as_ref()
            .and_then(|b| b.train.as_ref())
            .map(|t| t.steps),
        Some(25)
    );
    let stages = &out.report.train.stages;
    assert_eq!(stages.len(), 2);
    assert_eq!(
        (stages[0].name.as_str(), stages[0].steps, stages[0].first_step),
        ("embeddings", 15, 0)
    );
    assert_eq!(
        (stages[1].name.as_str(), stages[1].steps, stages[1].first_step),
        ("all", 10, 15)
    );
    assert!(stages[0].trainable_params < stages[1].trainable_params);
    assert!(stages.iter().all(|s| s.val_loss.is_some_and(f64::is_finite)));
    assert!((stages[1].lr - 3e-3).abs() < 1e-12);

    // The boundary checkpoint holds the weights after stage 1: the blocks still at init.
    let boundary = run_dir.join("checkpoints/student/step-00000015");
    assert!(boundary.is_dir(), "no checkpoint at the stage boundary");
    let after_1 = load(&boundary.join("model.safetensors"));
    let (cfg, _) = config::load(Some(&tmp.path().join("config.toml")), &[]).expect("cfg");
    let seed = cfg.run.seed;
    let init = Pipeline::assemble(cfg, &registry)
        .expect("assemble")
        .build_student(seeds::student_init(seed))
        .expect("student");
    let last = load(&run_dir.join("student/model.safetensors"));
    for (name, var) in init.vars() {
        let d1 = max_abs_diff(var.as_tensor(), &after_1[&name]);
        let d2 = max_abs_diff(var.as_tensor(), &last[&name]);
        if name.starts_with("transformer.h.") {
            assert_eq!(d1, 0.0, "{name} moved in the frozen stage");
            if name.ends_with("c_attn.weight") {
                assert!(d2 > 0.0, "{name} did not train in stage 2");
            }
        } else if name == "transformer.wte.weight" {
            assert!(d1 > 0.0, "{name} did not train in stage 1");
        }
    }

    // Metrics: every train record says its stage; weights follow the stage's override.
    let metrics = read_metrics(run_dir);
    let student_train: Vec<_> = metrics
        .iter()
        .filter(|m| m["event"] == "train" && m["phase"] == "student")
        .collect();
    for m in &student_train {
        let step = m["step"].as_u64().expect("step");
        let stage = if step <= 15 { "embeddings" } else { "all" };
        assert_eq!(m["stage"], stage, "{m}");
        let ce_weight = m["weights"]["ce"].as_f64().expect("ce weight");
        assert_eq!(ce_weight, if step <= 15 { 0.0 } else { 0.5 }, "{m}");
    }
    assert!(
        student_train.iter().any(|m| m["step"] == 15),
        "the stage's last step is logged"
    );
    let groups: Vec<_> = metrics
        .iter()
        .filter(|m| m["event"] == "param_groups" && m["phase"] == "student")
        .collect();
    assert_eq!(groups.len(), 2, "one group table per stage");
    assert_eq!(groups[1]["stage"], "all");
    let ends: Vec<_> = metrics.iter().filter(|m| m["event"] == "stage_end").collect();
    assert_eq!(ends.len(), 2);
    let md = std::fs::read_to_string(run_dir.join("report.md")).expect("report.md");
    assert!(
        md.contains("## Stages") && md.contains("| embeddings | 15 |") && md.contains("| all | 10 |"),
        "{md}"
    );
}

/// Rewinds a finished run to its student checkpoint at `step` (as if killed right after it),
/// forgetting the later phases.
fn rewind_to(run_dir: &Path, step: usize) {
    let progress_path = run_dir.join("progress.json");
    let mut progress: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&progress_path).expect("progress")).expect("json");
    let completed = progress["progress"]["completed"].as_object_mut().expect("completed");
    completed.remove("student");
    completed.remove("baseline");
    // The record carries the digest of its body: seal the rewound one.
    let body = serde_json::to_vec(&progress["progress"]).expect("json");
    progress["sha256"] = serde_json::json!(sha256_hex(&body));
    std::fs::write(&progress_path, serde_json::to_vec(&progress).expect("json")).expect("write");
    for d in ["student", "baseline", "checkpoints/baseline"] {
        let _ = std::fs::remove_dir_all(run_dir.join(d));
    }
    let keep = format!("step-{step:08}");
    for e in std::fs::read_dir(run_dir.join("checkpoints/student"))
        .expect("ls")
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("step-") && n > keep {
            std::fs::remove_dir_all(e.path()).expect("rm");
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Records the checksum of a rewritten `state.json` in its checkpoint's manifest (which covers
/// it), so that the marked checkpoint is a valid one.
fn seal_state(state_path: &Path, bytes: &[u8]) {
    let manifest_path = state_path.with_file_name("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest")).expect("json");
    manifest["sha256"]["state.json"] = serde_json::json!(sha256_hex(bytes));
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json")).expect("write");
}

#[test]
fn resuming_at_and_after_a_stage_boundary_ends_with_the_same_weights() {
    let registry = retort_host::builtin_registry().expect("registry");
    let full = tempfile::tempdir().expect("tmp");
    let sets: Vec<&str> = [
        "train.checkpoint_every=5",
        "train.keep_checkpoints=10",
        "teacher.pretrain.steps=20",
    ]
    .into();
    let a = run_in(&registry, full.path(), &two_stage_config(), &sets, false).expect("uninterrupted");
    let want = load(&a.dir.join("student/model.safetensors"));
    let want_metrics = training_records(&a.dir);
    // 15: the boundary (stage 2 starts with a fresh optimizer); 20: inside stage 2.
    for step in [15, 20] {
        let copy = tempfile::tempdir().expect("tmp");
        copy_dir(&a.dir, &copy.path().join("run"));
        rewind_to(&copy.path().join("run"), step);
        // Mark the checkpoint (its first recorded loss) to prove the run continued from it.
        let state_path = copy
            .path()
            .join(format!("run/checkpoints/student/step-{step:08}/state.json"));
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
        state["losses"][0] = serde_json::json!(1.0e6);
        let marked = serde_json::to_vec(&state).expect("json");
        std::fs::write(&state_path, &marked).expect("write");
        seal_state(&state_path, &marked);
        let b = run_in(&registry, copy.path(), &two_stage_config(), &sets, true).expect("resumed");
        assert!(
            b.report.train.loss_start > 1e5,
            "resumed at {step}: did not continue from the checkpoint"
        );
        let got = load(&b.dir.join("student/model.safetensors"));
        for (name, t) in &want {
            assert_eq!(max_abs_diff(t, &got[name]), 0.0, "resumed at {step}: {name} differs");
        }
        let got_metrics = training_records(&b.dir);
        assert_eq!(got_metrics, want_metrics, "resumed at {step}: metrics differ");
        let (sa, sb) = (a.report.train.stages.clone(), b.report.train.stages.clone());
        // Stage 1's end loss averages its last ten steps, which do not include the marked one.
        assert_eq!(sb, sa);
    }
}

/// The `train` and `stage_end` records of a run, without their timing fields.
fn training_records(dir: &Path) -> Vec<serde_json::Value> {
    read_metrics(dir)
        .into_iter()
        .filter(|m| m["event"] == "train" || m["event"] == "stage_end")
        .map(|mut m| {
            if let Some(o) = m.as_object_mut() {
                o.remove("elapsed_s");
                o.remove("tokens_per_s");
            }
            m
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("ls").flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

#[test]
fn early_stopping_keeps_and_exports_the_best_weights() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    // min_delta far above any change: the first evaluation (step 5) is the best, the next one
    // does not improve, patience 1 stops at step 10.
    let toml =
        tiny_config("early") + "\n[train.early_stopping]\nmetric = \"val_loss\"\npatience = 1\nmin_delta = 100.0\n";
    let sets = [
        "train.eval_every=5",
        "train.checkpoint_every=5",
        "train.keep_checkpoints=1",
        "teacher.pretrain.steps=20",
    ];
    let out = run_in(&registry, tmp.path(), &toml, &sets, false).expect("run");
    let t = out.report.student.train.as_ref().expect("train report");
    assert_eq!(t.stopped_early_at, Some(10));
    assert_eq!(t.steps, 10);
    let best = t.best.as_ref().expect("best");
    assert_eq!((best.metric.as_str(), best.step), ("val_loss", 5));
    // The exported weights are the best ones, and the report evaluated them.
    let best_dir = out.dir.join("checkpoints/student/best");
    let kept = load(&best_dir.join("model.safetensors"));
    let exported = load(&out.dir.join("student/model.safetensors"));
    for (name, t) in &kept {
        assert_eq!(max_abs_diff(t, &exported[name]), 0.0, "{name}");
    }
    assert!((out.report.student.val_loss - best.value).abs() < 1e-9);
    // keep_checkpoints = 1 pruned the step checkpoints, never the best.
    let names: Vec<String> = std::fs::read_dir(out.dir.join("checkpoints/student"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"best".to_string()) && names.iter().filter(|n| n.starts_with("step-")).count() == 1,
        "{names:?}"
    );
    let metrics = read_metrics(&out.dir);
    assert!(metrics
        .iter()
        .any(|m| m["event"] == "early_stop" && m["phase"] == "student" && m["step"] == 10));
    let md = std::fs::read_to_string(out.dir.join("report.md")).expect("md");
    assert!(md.contains("stopped early at step 10"), "{md}");
}

#[test]
fn early_stopping_on_agreement_runs_to_the_end_while_it_improves() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = tiny_config("agree") + "\n[train.early_stopping]\nmetric = \"top1_agreement\"\npatience = 100\n";
    let out = run_in(
        &registry,
        tmp.path(),
        &toml,
        &[
            "train.eval_every=10",
            "teacher.pretrain.steps=20",
            "eval.baseline=false",
        ],
        false,
    )
    .expect("run");
    let t = out.report.student.train.as_ref().expect("train");
    assert_eq!(t.stopped_early_at, None);
    let best = t.best.as_ref().expect("best");
    assert_eq!(best.metric, "top1_agreement");
    // The exported model's agreement is the best one seen (higher is better).
    let agree = out.report.student.top1_agreement.expect("agreement");
    assert!((agree - best.value).abs() < 1e-12, "{agree} vs {best:?}");
    let evals: Vec<f64> = read_metrics(&out.dir)
        .iter()
        .filter(|m| m["event"] == "eval" && m["phase"] == "student")
        .map(|m| m["top1_agreement"].as_f64().expect("agreement"))
        .collect();
    assert!(evals.iter().all(|&v| v <= best.value), "{evals:?} vs {best:?}");
}

#[test]
fn stage_and_early_stopping_mistakes_are_config_errors() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let bad_term = two_stage_config().replace("loss_weights = { ce = 0.0, kl = 1.0 }", "loss_weights = { kld = 1.0 }");
    let err = run_in(&registry, tmp.path(), &bad_term, &[], false)
        .err()
        .expect("refused");
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(
        msg.contains("stages[0].loss_weights.kld") && msg.contains("kl, ce"),
        "{msg}"
    );

    let bad_group = two_stage_config().replace(r"transformer\.h\..*", "nothing.*");
    let err = run_in(&registry, tmp.path(), &bad_group, &[], false)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("stages[0].param_groups[0].pattern"), "{err}");

    let no_eval = tiny_config("e") + "\n[train.early_stopping]\npatience = 2\n";
    let err = run_in(&registry, tmp.path(), &no_eval, &["train.eval_every=0"], false)
        .err()
        .expect("refused");
    assert!(matches!(err, Error::Config { .. }) || err.exit_code() == 2, "{err}");
    assert!(err.to_string().contains("train.eval_every"), "{err}");
}
