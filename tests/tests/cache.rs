//! The offline teacher logit cache end to end: a student trained from a cache follows the live
//! teacher's loss curve, builds resume and are deterministic, and every mismatch or corruption
//! is refused with a message naming it.

use std::path::{Path, PathBuf};

use retort_core::{Error, Registry};
use retort_host::assemble::{config, Pipeline};
use retort_host::engine::cache::{self, CacheOptions};
use retort_plugins::cache::LogitStore;
use retort_tests::{read_metrics, run_in, tiny_config};

/// A tiny run whose teacher is trained first (so that there is a checkpoint to cache).
fn teacher_run(registry: &Registry, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dir");
    let toml = tiny_config("cache_teacher");
    run_in(
        registry,
        dir,
        &toml,
        &[
            "teacher.pretrain.steps=40",
            "train.steps=2",
            "eval.baseline=false",
            "train.checkpoint_every=0",
        ],
        false,
    )
    .expect("teacher run");
    dir.join("run/teacher")
}

/// The tiny config with a live teacher from `checkpoint`, `topk_kl` (k = 8 of 16) + CE, aligned
/// windows.
fn live_config(checkpoint: &Path, losses: &str) -> String {
    tiny_config("cache_live")
        .replace("[teacher.pretrain]\nsteps = 60\nlr = 1e-2\n\n", "")
        .replace(
            "context = 16\n\n[student]",
            &format!("context = 16\ncheckpoint = \"{}\"\n\n[student]", checkpoint.display()),
        )
        .replace(
            "[[loss]]\nkind = \"kl\"\nweight = 0.5\ntemperature = 2.0\n\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n",
            losses,
        )
        .replace("seq_len = 16\n", "seq_len = 16\nwindows = \"aligned\"\n")
        .replace("baseline = true", "baseline = false")
}

/// The same run reading the teacher from the cache at `cache`.
fn cached_config(live: &str, cache: &Path) -> String {
    let start = live.find("[teacher]").expect("teacher");
    let end = live.find("[student]").expect("student");
    format!(
        "{}[teacher]\nkind = \"cached\"\npath = \"{}\"\n\n{}",
        &live[..start],
        cache.display(),
        &live[end..]
    )
}

const TOPK_CE: &str = "[[loss]]\nkind = \"topk_kl\"\nk = 8\nweight = 0.5\n\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n";
const KL_CE: &str =
    "[[loss]]\nkind = \"kl\"\nweight = 0.5\ntemperature = 2.0\n\n[[loss]]\nkind = \"ce\"\nweight = 0.5\n";

fn build(
    registry: &Registry,
    dir: &Path,
    toml: &str,
    out: &Path,
    k: usize,
    values: &str,
    shard_tokens: usize,
) -> retort_core::Result<retort_plugins::cache::BuildSummary> {
    let cfg = dir.join("cache_config.toml");
    std::fs::write(&cfg, toml).expect("write config");
    let (cfg, _) = config::load(Some(&cfg), &[])?;
    let pipeline = Pipeline::assemble(cfg, registry)?;
    cache::build(
        &pipeline,
        &CacheOptions {
            out: Some(out.to_path_buf()),
            k,
            coding: retort_host::engine::cache::CodingArgs {
                values: values.into(),
                zstd_level: 3,
                ..Default::default()
            },
            shard_tokens,
            batch_windows: Some(16),
            teacher_id: None,
            force: false,
            progress: false,
        },
    )
    .map(|(_, s, _)| s)
}

/// `(step, loss)` of every train record.
fn curve(run_dir: &Path) -> Vec<(u64, f64)> {
    read_metrics(run_dir)
        .into_iter()
        .filter(|r| r["phase"] == "student" && r["event"] == "train")
        .map(|r| (r["step"].as_u64().expect("step"), r["loss"].as_f64().expect("loss")))
        .collect()
}

fn assert_same_curve(a: &[(u64, f64)], b: &[(u64, f64)], rel: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: record counts");
    assert!(!a.is_empty(), "{what}: no train records");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= rel * la.abs().max(1e-3),
            "{what}: step {sa}: live {la} vs cached {lb}"
        );
    }
}

#[test]
fn a_student_trained_from_the_cache_follows_the_live_teacher() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = teacher_run(&registry, &tmp.path().join("teacher"));

    // topk_kl (k = 8 of 16) from an exact f32 cache: the same targets, the same curve.
    let live = live_config(&ck, TOPK_CE);
    let live_dir = tmp.path().join("live");
    std::fs::create_dir_all(&live_dir).expect("dir");
    let live_out = run_in(&registry, &live_dir, &live, &[], false).expect("live run");
    let f32_cache = tmp.path().join("cache_f32");
    build(&registry, tmp.path(), &live, &f32_cache, 8, "f32", 4096).expect("build f32");
    let cached_dir = tmp.path().join("cached");
    std::fs::create_dir_all(&cached_dir).expect("dir");
    let cached_out = run_in(&registry, &cached_dir, &cached_config(&live, &f32_cache), &[], false).expect("cached run");
    assert_same_curve(
        &curve(&live_out.dir),
        &curve(&cached_out.dir),
        1e-5,
        "topk_kl, f32 cache",
    );
    let (a, b) = (live_out.report.student.val_loss, cached_out.report.student.val_loss);
    assert!((a - b).abs() < 1e-5, "final val loss: live {a} vs cached {b}");

    // The default sqrt coding: the same curve within the quantisation error.
    let sqrt_cache = tmp.path().join("cache_sqrt");
    build(&registry, tmp.path(), &live, &sqrt_cache, 8, "sqrt", 4096).expect("build sqrt");
    let sqrt_dir = tmp.path().join("cached_sqrt");
    std::fs::create_dir_all(&sqrt_dir).expect("dir");
    let sqrt_out = run_in(&registry, &sqrt_dir, &cached_config(&live, &sqrt_cache), &[], false).expect("sqrt run");
    assert_same_curve(
        &curve(&live_out.dir),
        &curve(&sqrt_out.dir),
        2e-2,
        "topk_kl, sqrt cache",
    );

    // `kl` at T = 2 from a cache holding the whole vocabulary (k = V = 16): the sparse form is
    // then the dense KL, so the curve matches the live teacher's.
    let live_kl = live_config(&ck, KL_CE);
    let kl_live_dir = tmp.path().join("live_kl");
    std::fs::create_dir_all(&kl_live_dir).expect("dir");
    let kl_live = run_in(&registry, &kl_live_dir, &live_kl, &[], false).expect("live kl");
    let full_cache = tmp.path().join("cache_full");
    build(&registry, tmp.path(), &live_kl, &full_cache, 16, "f32", 4096).expect("build full");
    let kl_cached_dir = tmp.path().join("cached_kl");
    std::fs::create_dir_all(&kl_cached_dir).expect("dir");
    let kl_cached = run_in(
        &registry,
        &kl_cached_dir,
        &cached_config(&live_kl, &full_cache),
        &[],
        false,
    )
    .expect("cached kl");
    assert_same_curve(&curve(&kl_live.dir), &curve(&kl_cached.dir), 1e-4, "kl, full f32 cache");
    // The evaluation figures against the cached teacher are those against the live one.
    let (a, b) = (
        kl_live.report.student.kl_to_teacher,
        kl_cached.report.student.kl_to_teacher,
    );
    let (a, b) = (a.expect("kl"), b.expect("kl"));
    assert!((a - b).abs() < 1e-4, "kl_to_teacher: live {a} vs cached {b}");
}

#[test]
fn builds_are_deterministic_and_resume_keeping_finished_shards() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = teacher_run(&registry, &tmp.path().join("teacher"));
    let live = live_config(&ck, TOPK_CE);
    let first = tmp.path().join("first");
    let s = build(&registry, tmp.path(), &live, &first, 8, "sqrt", 2048).expect("build");
    // 20000 train tokens -> 1249 windows of 16 -> 10 shards of 128 windows; 2000 val -> 1.
    assert_eq!((s.shards_built, s.shards_kept), (11, 0));
    let shard = |dir: &Path, name: &str| std::fs::read(dir.join(name)).expect("shard");
    let names: Vec<String> = (0..10)
        .map(|i| format!("train-{i:05}.shard"))
        .chain(["val-00000.shard".into()])
        .collect();

    // A second build elsewhere writes the same bytes.
    let second = tmp.path().join("second");
    build(&registry, tmp.path(), &live, &second, 8, "sqrt", 2048).expect("build again");
    for n in &names {
        assert!(shard(&first, n) == shard(&second, n), "{n} differs between two builds");
    }

    // As a killed build leaves it: one shard never written, one cut short, a stray temp file.
    let keep = shard(&first, &names[3]);
    std::fs::remove_file(first.join(&names[7])).expect("rm");
    std::fs::write(first.join(&names[3]), &keep[..keep.len() / 2]).expect("truncate");
    std::fs::write(first.join(format!(".{}.tmp-999", names[7])), b"partial").expect("temp");
    let e = LogitStore::open(&first)
        .err()
        .expect("an incomplete cache must not open");
    assert!(e.to_string().contains(&names[3]), "{e}");
    let s = build(&registry, tmp.path(), &live, &first, 8, "sqrt", 2048).expect("resume");
    assert_eq!((s.shards_built, s.shards_kept), (2, 9));
    assert_eq!(s.tokens_computed, 2 * 128 * 16);
    for n in &names {
        assert!(shard(&first, n) == shard(&second, n), "{n} differs after the resume");
    }
    LogitStore::open(&first).expect("complete again");

    // Other settings at the same place: refused without --force, naming the difference.
    let e = build(&registry, tmp.path(), &live, &first, 4, "sqrt", 2048).expect_err("refused");
    assert!(e.to_string().contains("k: 8 there, 4 now"), "{e}");
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn mismatches_and_corruption_are_refused_naming_them() {
    let registry = retort_host::builtin_registry().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let ck = teacher_run(&registry, &tmp.path().join("teacher"));
    let live = live_config(&ck, TOPK_CE);
    let cache = tmp.path().join("cache");
    build(&registry, tmp.path(), &live, &cache, 8, "sqrt", 4096).expect("build");
    let cached = cached_config(&live, &cache);
    let dir = tmp.path().join("runs");
    std::fs::create_dir_all(&dir).expect("dir");
    let refuse = |toml: &str, sets: &[&str], needle: &str| {
        let e = run_in(&registry, &dir, toml, sets, false)
            .err()
            .unwrap_or_else(|| panic!("ran despite: {needle}"));
        assert!(e.to_string().contains(needle), "expected `{needle}` in: {e}");
        assert_eq!(e.exit_code(), 2, "{e}");
    };
    refuse(
        &cached,
        &["train.seq_len=8"],
        "window length (train.seq_len) is 16 in the cache and 8 in the run",
    );
    refuse(&cached, &["data.train_tokens=20016"], "Train split's token count");
    refuse(&cached, &["run.seed=8"], "token stream (fingerprint)");
    refuse(&cached, &["data.vocab=17"], "tokenizer");
    refuse(&cached, &["train.windows=\"random\""], "train.windows");
    refuse(&cached.replace("k = 8", "k = 9"), &[], "teacher tap `topk.9`");
    refuse(
        &cached.replace("kind = \"topk_kl\"\nk = 8", "kind = \"reverse_kl\""),
        &[],
        "`reverse_kl` needs the teacher's dense logits",
    );
    refuse(
        &cached.replace("kind = \"topk_kl\"\nk = 8", "kind = \"hidden_mse\""),
        &[],
        "loss[0]",
    );

    // Corruption: a flipped byte, a truncated shard, a missing shard: each named.
    let shard = cache.join("train-00002.shard");
    let good = std::fs::read(&shard).expect("read");
    let mut flipped = good.clone();
    let i = flipped.len() / 2;
    flipped[i] ^= 0x10;
    for (what, bytes) in [("flipped", flipped), ("truncated", good[..good.len() - 9].to_vec())] {
        std::fs::write(&shard, &bytes).expect("write");
        let e: Error = LogitStore::open(&cache)
            .err()
            .unwrap_or_else(|| panic!("{what} shard opened"));
        assert!(e.to_string().contains("train-00002.shard"), "{what}: {e}");
        refuse(&cached, &[], "train-00002.shard");
    }
    std::fs::remove_file(&shard).expect("rm");
    refuse(&cached, &[], "train-00002.shard is missing");
    std::fs::write(&shard, &good).expect("restore");
    LogitStore::open(&cache).expect("restored");
}
