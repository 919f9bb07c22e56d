//! End to end through the public API: a pipeline built from a TOML string in a temp dir.

use std::path::Path;

use retort_host::assemble::config;
use retort_host::assemble::{Pipeline, TeacherPlan};
use retort_host::engine::run::{run, RunOptions};
use retort_tests::{read_metrics, tiny_config};

fn run_config(dir: &Path, toml: &str, sets: &[String]) -> retort_host::engine::run::RunOutcome {
    let cfg_path = dir.join("config.toml");
    std::fs::write(&cfg_path, toml).expect("write config");
    let registry = retort_host::builtin_registry().expect("registry");
    let (cfg, origin) = config::load(Some(&cfg_path), sets).expect("config loads");
    let pipeline = Pipeline::assemble(cfg, &registry).expect("pipeline assembles");
    let opts = RunOptions {
        out: Some(dir.join("run")),
        force: false,
        progress: false,
        ..Default::default()
    };
    run(pipeline, &origin, &opts).expect("run succeeds")
}

#[test]
fn tiny_run_trains_distills_and_reports() {
    let tmp = tempfile::tempdir().expect("tmp");
    let outcome = run_config(tmp.path(), &tiny_config("e2e"), &[]);
    let dir = outcome.dir;

    // Contract: report.json keys.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json")).expect("json");
    for who in ["teacher", "student", "baseline"] {
        for key in ["params", "val_loss", "perplexity"] {
            assert!(report[who][key].is_number(), "{who}.{key} missing: {report}");
        }
    }
    for key in ["top1_agreement", "kl_to_teacher", "gap_to_teacher"] {
        assert!(report["student"][key].is_number(), "student.{key}");
    }
    for key in ["steps", "tokens", "wall_s", "tokens_per_s"] {
        assert!(report["train"][key].is_number(), "train.{key}");
    }
    assert_eq!(report["train"]["steps"], 40);
    assert_eq!(report["train"]["tokens"], 40 * 8 * 16);
    let (tp, sp) = (
        report["teacher"]["params"].as_u64().expect("p"),
        report["student"]["params"].as_u64().expect("p"),
    );
    assert!(sp * 4 <= tp, "student {sp} vs teacher {tp}");
    assert!(std::fs::read_to_string(dir.join("report.md"))
        .expect("md")
        .contains("| student (distilled) |"));

    // The loss decreased in every training phase (metrics.jsonl, one record per 5 steps).
    let metrics = read_metrics(&dir);
    for phase in ["teacher", "student", "baseline"] {
        let losses: Vec<f64> = metrics
            .iter()
            .filter(|m| m["event"] == "train" && m["phase"] == phase)
            .map(|m| m["loss"].as_f64().expect("loss"))
            .collect();
        assert!(losses.len() >= 8, "{phase}: {} records", losses.len());
        assert!(
            losses.last() < losses.first(),
            "{phase} loss did not decrease: {losses:?}"
        );
    }
    assert!(metrics.iter().any(|m| m["event"] == "eval" && m["phase"] == "student"));
    // The pretrained teacher beats the untrained level log(16) clearly.
    assert!(report["teacher"]["val_loss"].as_f64().expect("t") < 16f64.ln() - 0.3);

    // Student weights in Hugging Face layout.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("student/config.json")).expect("config.json")).expect("json");
    assert_eq!(cfg["model_type"], "gpt2");
    assert!(dir.join("student/model.safetensors").is_file());

    // The resolved config loads back to the same run.
    let (again, _) = config::load(Some(&dir.join("config.resolved.toml")), &[]).expect("resolved config loads");
    assert_eq!(again.train.steps, 40);
    assert_eq!(
        again.loss,
        config::load(Some(&tmp.path().join("config.toml")), &[])
            .expect("c")
            .0
            .loss
    );
}

#[test]
fn teacher_checkpoint_from_a_previous_run_is_reused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let first = run_config(tmp.path(), &tiny_config("first"), &["eval.baseline=false".into()]);
    let teacher_dir = first.dir.join("teacher");
    let tmp2 = tempfile::tempdir().expect("tmp");
    let toml = tiny_config("second").replace("[teacher.pretrain]\nsteps = 60\nlr = 1e-2\n", "");
    let cfg_path = tmp2.path().join("config.toml");
    std::fs::write(&cfg_path, &toml).expect("write");
    let registry = retort_host::builtin_registry().expect("registry");
    let sets = vec![
        format!("teacher.checkpoint=\"{}\"", teacher_dir.display()),
        "eval.baseline=false".to_string(),
    ];
    let (cfg, origin) = config::load(Some(&cfg_path), &sets).expect("load");
    let pipeline = Pipeline::assemble(cfg, &registry).expect("assemble");
    assert!(matches!(pipeline.teacher_plan, TeacherPlan::Load));
    let opts = RunOptions {
        out: Some(tmp2.path().join("run")),
        force: false,
        progress: false,
        ..Default::default()
    };
    let second = run(pipeline, &origin, &opts).expect("run");
    // Same weights, same validation windows: the same teacher loss, bit for bit.
    assert_eq!(first.report.teacher.val_loss, second.report.teacher.val_loss);
    assert!(second.report.teacher.train.is_none());
    assert!(second.report.baseline.is_none());
}

#[test]
fn same_seed_same_result() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let sets: Vec<String> = vec!["teacher.pretrain.steps=10".into(), "train.steps=10".into()];
    let ra = run_config(a.path(), &tiny_config("det"), &sets);
    let rb = run_config(b.path(), &tiny_config("det"), &sets);
    assert_eq!(ra.report.student.val_loss, rb.report.student.val_loss);
    assert_eq!(
        ra.report.baseline.as_ref().map(|m| m.val_loss),
        rb.report.baseline.as_ref().map(|m| m.val_loss)
    );
}

#[test]
fn feature_terms_schedules_and_routers_compose() {
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = tiny_config("compose").replace(
        "[[loss]]\nkind = \"kl\"\nweight = 0.5\ntemperature = 2.0\n",
        r#"[[loss]]
kind = "kl"
weight = 0.5
temperature = { kind = "linear", start = 3.0, end = 1.0 }

[[loss]]
kind = "hidden_mse"
weight = 0.2
map = "uniform"

[[loss]]
kind = "jsd"
weight = { kind = "piecewise", points = [[0.0, 0.0], [0.5, 0.3]] }
beta = 0.5

[router]
kind = "magnitude"
decay = 0.8
"#,
    );
    let sets = vec![
        "eval.baseline=false".to_string(),
        "train.lr={ kind = \"exponential\", start = 0.01, end = 0.001 }".to_string(),
    ];
    let out = run_config(tmp.path(), &toml, &sets);
    let metrics = read_metrics(&out.dir);
    let student: Vec<&serde_json::Value> = metrics
        .iter()
        .filter(|m| m["event"] == "train" && m["phase"] == "student")
        .collect();
    let first = student.first().expect("records");
    let last = student.last().expect("records");
    // Every term and its effective weight is logged; the scheduled temperature moved 3 -> 1.
    for name in ["kl", "hidden_mse", "jsd", "ce"] {
        assert!(
            first["terms"][name].is_number() && first["weights"][name].is_number(),
            "{name}: {first}"
        );
        assert!(last["router"][format!("magnitude.{name}")].is_number(), "{last}");
    }
    // The learning rate is a schedule too (times the warmup_cosine factor, 0.1 at the end).
    let lr_end = last["lr"].as_f64().expect("lr");
    assert!((lr_end - 0.001 * 0.1).abs() < 1e-5, "lr {lr_end}");
    let t0 = first["scalars"]["kl.temperature"].as_f64().expect("T");
    let t1 = last["scalars"]["kl.temperature"].as_f64().expect("T");
    assert!(t0 > 2.7 && t1 < 1.1, "temperature {t0} -> {t1}");
    // magnitude router: weight x running magnitude is in proportion to the configured shares;
    // the jsd share follows its piecewise schedule (0.3 * 0.1 / 0.5 = 0.06 at the first log,
    // progress 4/40, against kl's 0.5).
    let share = |rec: &serde_json::Value, n: &str| {
        rec["weights"][n].as_f64().expect("w") * rec["router"][format!("magnitude.{n}")].as_f64().expect("m")
    };
    let ratio = share(first, "jsd") / share(first, "kl");
    assert!((ratio - 0.06 / 0.5).abs() < 1e-6, "jsd/kl share {ratio}: {first}");
    let ratio = share(last, "hidden_mse") / share(last, "kl");
    assert!((ratio - 0.2 / 0.5).abs() < 1e-6, "hidden/kl share {ratio}");
    // hidden_mse on mismatched widths (32 vs 16) trained its projection and decreased.
    let h0 = first["terms"]["hidden_mse"].as_f64().expect("h");
    let h1 = last["terms"]["hidden_mse"].as_f64().expect("h");
    assert!(h1 < h0, "hidden_mse {h0} -> {h1}");
    // The projection is not part of the exported student.
    let names = candle_core::safetensors::load(out.dir.join("student/model.safetensors"), &candle_core::Device::Cpu)
        .expect("exported student");
    assert!(
        names.keys().all(|k| k.starts_with("transformer.")),
        "{:?}",
        names.keys()
    );
}

#[test]
fn student_aware_router_logs_its_quantities_and_paces_feature_terms() {
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = tiny_config("aware").replace(
        "[[loss]]\nkind = \"ce\"\nweight = 0.5\n",
        "[[loss]]\nkind = \"ce\"\nweight = 0.5\n\n[[loss]]\nkind = \"hidden_cosine\"\nweight = 0.3\n\n[router]\nkind = \"student_aware\"\n",
    );
    let out = run_config(tmp.path(), &toml, &["eval.baseline=false".into()]);
    let metrics = read_metrics(&out.dir);
    let recs: Vec<&serde_json::Value> = metrics
        .iter()
        .filter(|m| m["event"] == "train" && m["phase"] == "student")
        .collect();
    for rec in &recs {
        let r = &rec["router"];
        for key in [
            "gap_mean",
            "token_weight_min",
            "token_weight_max",
            "confidence_student",
            "readiness",
            "trend",
            "pace",
        ] {
            assert!(r[key].is_number(), "router.{key} missing: {rec}");
        }
        let pace = r["pace"].as_f64().expect("pace");
        assert!((0.0..=1.0).contains(&pace));
        // Feature term paced, logit terms untouched.
        assert!(
            (rec["weights"]["hidden_cosine"].as_f64().expect("w") - 0.3 * pace).abs() < 1e-9,
            "{rec}"
        );
        assert_eq!(rec["weights"]["kl"], 0.5);
        assert!(r["token_weight_max"].as_f64().expect("w") >= 1.0 && r["token_weight_min"].as_f64().expect("w") <= 1.0);
    }
}
