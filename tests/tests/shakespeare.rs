//! A short distillation on real text: the Tiny Shakespeare corpus from `../shared/data`.

use retort_host::assemble::config;
use retort_host::assemble::Pipeline;
use retort_host::engine::run::{run, RunOptions};

#[test]
fn char_level_distillation_on_tinyshakespeare() {
    let Some(corpus) = retort_tests::tinyshakespeare() else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tmp");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/configs/shakespeare_char.toml");
    let sets = vec![
        format!("data.path=\"{}\"", corpus.display()),
        "teacher.pretrain.steps=30".into(),
        "train.steps=20".into(),
        "train.log_every=5".into(),
        "eval.batches=2".into(),
    ];
    let registry = retort_host::builtin_registry().expect("registry");
    let (cfg, origin) = config::load(Some(&config), &sets).expect("config");
    let pipeline = Pipeline::assemble(cfg, &registry).expect("assemble");
    assert_eq!(pipeline.vocab_size, 65, "Tiny Shakespeare has 65 distinct characters");
    let out = run(
        pipeline,
        &origin,
        &RunOptions {
            out: Some(tmp.path().join("run")),
            force: false,
            progress: false,
            ..Default::default()
        },
    )
    .expect("run");
    let r = &out.report;
    assert!(r.student.params * 4 <= r.teacher.params);
    // 30 steps of a char model already beat the uniform level ln 65 = 4.17.
    assert!(r.teacher.val_loss < 65f64.ln() - 0.5, "teacher {}", r.teacher.val_loss);
    assert!(r.train.loss_end < r.train.loss_start);
}
