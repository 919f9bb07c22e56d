//! The logit terms fused with the student's output head (`train.lm_head`): a run on the fused
//! path trains the same weights as on the full logits, in every phase and with gradient
//! accumulation, and the path is chosen by the terms, the router and the switch.

use std::path::Path;

use candle_core::{Device, Tensor};
use retort_host::assemble::{config, Pipeline};
use retort_host::engine::phase::HeadPath;
use retort_tests::{max_abs_diff, read_metrics, run_in, tiny_config};

fn weights(dir: &Path, model: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join(format!("run/{model}/model.safetensors")), &Device::Cpu).expect("weights")
}

/// The largest weight difference between the runs in `a` and `b`, over every model, but the
/// attention's `c_attn.bias`: its key part has a true gradient of zero (a softmax does not see
/// a constant added to a query's scores), so AdamW turns the float noise of either path into
/// steps of the learning rate's size.
fn worst_difference(a: &Path, b: &Path) -> f32 {
    let mut worst = 0f32;
    for model in ["teacher", "student", "baseline"] {
        let (wa, wb) = (weights(a, model), weights(b, model));
        for (name, t) in wa.iter().filter(|(n, _)| !n.ends_with("c_attn.bias")) {
            worst = worst.max(max_abs_diff(t, &wb[name]));
        }
    }
    worst
}

fn path_of(toml: &str, sets: &[&str]) -> HeadPath {
    let registry = retort_host::builtin_registry().expect("registry");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg_path = dir.path().join("config.toml");
    std::fs::write(&cfg_path, toml).expect("write");
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (cfg, _) = config::load(Some(&cfg_path), &sets).expect("config");
    let p = Pipeline::assemble(cfg, &registry).expect("assemble");
    let t = &p.config.train;
    HeadPath::choose(
        &t.lm_head,
        &p.terms,
        p.router().expect("router").as_ref(),
        &p.student_taps,
        p.vocab_size,
        t.batch_size * t.seq_len,
    )
}

#[test]
fn a_fused_run_trains_the_weights_of_the_full_logits() {
    let registry = retort_host::builtin_registry().expect("registry");
    let common = ["train.steps=16", "teacher.pretrain.steps=16", "train.grad_accum=2"];
    let toml = tiny_config("fused");
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    // 8 windows x 16 tokens in chunks of 24: five full chunks and a ragged one.
    let fused: Vec<&str> = common
        .iter()
        .copied()
        .chain(["train.lm_head.chunk_tokens=24"])
        .collect();
    let full: Vec<&str> = common.iter().copied().chain(["train.lm_head.fused=false"]).collect();
    assert_eq!(path_of(&toml, &fused), HeadPath::Fused { chunk: 24 });
    assert!(matches!(path_of(&toml, &full), HeadPath::Full(_)));
    let ra = run_in(&registry, a.path(), &toml, &fused, false).expect("fused run");
    let rb = run_in(&registry, b.path(), &toml, &full, false).expect("full run");
    let worst = worst_difference(a.path(), b.path());
    // The same products and terms in another order: equal up to float error.
    assert!(worst < 1e-4, "max weight difference {worst}");
    assert!((ra.report.student.val_loss - rb.report.student.val_loss).abs() < 1e-4);
    let terms = |dir: &Path| -> Vec<f64> {
        read_metrics(&dir.join("run"))
            .iter()
            .filter(|r| r["event"] == "train" && r["phase"] == "student")
            .flat_map(|r| {
                [
                    r["terms"]["kl"].as_f64().expect("kl"),
                    r["terms"]["ce"].as_f64().expect("ce"),
                ]
            })
            .collect()
    };
    let (ta, tb) = (terms(a.path()), terms(b.path()));
    assert!(!ta.is_empty() && ta.len() == tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "term value {x} vs {y}");
    }
}

#[test]
fn the_path_follows_the_terms_the_router_and_the_switch() {
    let toml = tiny_config("path");
    let chunked = ["train.lm_head.chunk_tokens=32"];
    assert_eq!(path_of(&toml, &chunked), HeadPath::Fused { chunk: 32 });
    // 128 tokens x 16 classes fit in one automatic chunk.
    let HeadPath::Full(why) = path_of(&toml, &[]) else {
        panic!("a micro-batch within one chunk keeps the full logits")
    };
    assert!(why.contains("one chunk"), "{why}");
    let HeadPath::Full(why) = path_of(&toml, &["train.lm_head.chunk_tokens=32", "router.kind=magnitude"]) else {
        panic!("a router that reads the terms' values keeps the full logits")
    };
    assert!(why.contains("router"), "{why}");
    let with_hidden = format!("{toml}\n[[loss]]\nkind = \"hidden_mse\"\nweight = 0.1\nmap = \"uniform\"\n");
    let HeadPath::Full(why) = path_of(&with_hidden, &chunked) else {
        panic!("a feature term keeps the full logits")
    };
    assert!(why.contains("hidden_mse"), "{why}");
}
