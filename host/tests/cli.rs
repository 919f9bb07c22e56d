//! The `retort` binary: exit codes and messages for bad input, and the quick commands.

mod common;
use common::{assert_user_error, retort, retort_env, stderr};

/// 1-based line of the `nth` (0-based) line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str, nth: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with(prefix))
        .nth(nth)
        .map(|(i, _)| i + 1)
        .expect("line in config")
}

const TINY: &str = r#"
[run]
name = "cli"
[data]
kind = "text"
path = "corpus.txt"
[teacher]
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
[[loss]]
kind = "kl"
weight = 0.5
temperature = 2.0
[[loss]]
kind = "ce"
weight = 0.5
[train]
steps = 3
batch_size = 2
seq_len = 8
[eval]
batches = 1
batch_size = 2
"#;

fn setup(config: &str, corpus: Option<&str>) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::write(d.path().join("c.toml"), config).expect("write config");
    if let Some(text) = corpus {
        std::fs::write(d.path().join("corpus.txt"), text).expect("write corpus");
    }
    d
}

fn corpus() -> String {
    "To be, or not to be, that is the question.\n".repeat(20)
}

#[test]
fn check_accepts_a_good_config_and_the_quickstart() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("config OK"));
    let o = retort(&["check"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn unknown_key_names_path_file_line_and_accepted_keys() {
    let d = setup(
        &TINY.replace("steps = 3\nbatch_size = 2", "stpes = 3\nbatch_size = 2"),
        Some(&corpus()),
    );
    let o = retort(&["check", "c.toml"], d.path());
    assert_user_error(&o, &["train.stpes", "c.toml:", "expected one of", "`steps`"]);
}

#[test]
fn wrong_type_and_bad_values_are_config_errors() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml", "--set", "train.steps=lots"], d.path());
    assert_user_error(&o, &["train.steps", "--set train.steps=lots"]);
    let o = retort(&["check", "c.toml", "--set", "loss[0].temperature=-1"], d.path());
    assert_user_error(&o, &["loss[0].temperature", "in [0.001, 1000]"]);
    let o = retort(&["check", "c.toml", "--set", "loss[0].temperature=0"], d.path());
    assert_user_error(&o, &["loss[0].temperature"]);
    let d2 = setup(
        &TINY.replace("temperature = 2.0", "temperature = \"warm\""),
        Some(&corpus()),
    );
    let o = retort(&["check", "c.toml"], d2.path());
    assert_user_error(&o, &["loss[0].temperature", "c.toml:"]);
}

#[test]
fn unknown_plugin_kind_lists_known_kinds() {
    let d = setup(&TINY.replace("kind = \"kl\"", "kind = \"kld\""), Some(&corpus()));
    let o = retort(&["check", "c.toml"], d.path());
    assert_user_error(
        &o,
        &[
            "unknown loss kind `kld`",
            "loss[0].kind",
            "known loss kinds: attention, ce, ",
            ", kl, ",
        ],
    );
}

#[test]
fn bad_data_inputs_exit_2() {
    let missing = setup(TINY, None);
    assert_user_error(
        &retort(&["check", "c.toml"], missing.path()),
        &["data.path", "corpus.txt", "cannot read"],
    );
    let empty = setup(TINY, Some("   \n"));
    assert_user_error(&retort(&["check", "c.toml"], empty.path()), &["data.path", "empty"]);
    let short = setup(TINY, Some("abcdefghijklmnop"));
    assert_user_error(&retort(&["check", "c.toml"], short.path()), &["train.seq_len = 8"]);
    let nofile = setup(TINY, Some(&corpus()));
    assert_user_error(
        &retort(&["check", "nope.toml"], nofile.path()),
        &["nope.toml", "cannot read"],
    );
}

#[test]
fn usage_errors_exit_2() {
    let d = tempfile::tempdir().expect("tmp");
    assert_eq!(retort(&["frobnicate"], d.path()).status.code(), Some(2));
    assert_user_error(&retort(&["check", "--set", "novalue"], d.path()), &["KEY=VALUE"]);
}

#[test]
fn run_writes_the_run_dir_and_refuses_to_overwrite_it() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = d.path().join("out");
    for f in [
        "report.json",
        "report.md",
        "metrics.jsonl",
        "config.resolved.toml",
        "student/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| student (distilled) |") && stdout.contains("| baseline (scratch) |"),
        "{stdout}"
    );
    let report_before = std::fs::read(out.join("report.json")).expect("report");
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).expect("metrics");

    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_user_error(&o, &["holds another run", "--force"]);
    assert_eq!(std::fs::read(out.join("report.json")).expect("report"), report_before);
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).expect("metrics"),
        metrics_before
    );

    let o = retort(&["run", "c.toml", "--out", "out", "--quiet", "--force"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn plugins_json_lists_every_category() {
    let d = tempfile::tempdir().expect("tmp");
    let o = retort(&["plugins", "--json"], d.path());
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let cats: std::collections::BTreeSet<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["category"].as_str().expect("category"))
        .collect();
    for c in [
        "teacher",
        "student",
        "loss",
        "schedule",
        "router",
        "data",
        "tokenizer",
        "observer",
    ] {
        assert!(cats.contains(c), "{c} missing");
    }
    // Every kind declares its parameters: types, defaults, descriptions.
    let all = v.as_array().expect("array");
    let kl = all.iter().find(|e| e["kind"] == "kl").expect("kl");
    let t = &kl["params"]["properties"]["temperature"];
    assert_eq!(t["default"], 1.0, "{t}");
    assert!(
        t["description"].as_str().expect("description").contains("temperature"),
        "{t}"
    );
    let warm = all
        .iter()
        .find(|e| e["kind"] == "warmup_cosine")
        .expect("warmup_cosine");
    assert_eq!(warm["params"]["properties"]["min_ratio"]["type"], "number");
    assert_eq!(warm["params"]["additionalProperties"], false);
}

#[test]
fn plot_redraws_a_runs_charts_and_embeds_them_once() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["run", "c.toml", "--out", "out", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = d.path().join("out");
    let charts = ["train_loss.png", "student_terms.png", "learning_rate.png", "eval.png"];
    for c in charts {
        assert!(out.join("plots").join(c).is_file(), "{c} not drawn by the run");
    }
    std::fs::remove_dir_all(out.join("plots")).expect("rm plots");
    let o = retort(&["plot", "out"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for c in charts {
        let png = std::fs::read(out.join("plots").join(c)).expect("png");
        assert_eq!(&png[..4], b"\x89PNG", "{c}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).expect("md");
    assert_eq!(md.matches("## Plots").count(), 1, "{md}");
    assert!(md.contains("![Learning rate](plots/learning_rate.png)"), "{md}");

    let o = retort(&["plot", "nowhere"], d.path());
    assert_user_error(&o, &["nowhere", "metrics.jsonl"]);
}

#[test]
fn generate_continues_a_prompt_from_a_gguf_file_deterministically() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("tiny.gguf");
    retort_plugins::testing::write_tiny_gguf(&gguf, 262, candle_core::quantized::GgmlDType::Q8_0, 1).expect("gguf");
    let g = gguf.to_str().expect("utf8");
    let args = [
        "generate",
        "--model",
        g,
        "--prompt",
        "the theme",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "3",
    ];
    let a = retort(&args, tmp.path());
    assert_eq!(a.status.code(), Some(0), "{}", stderr(&a));
    let out = String::from_utf8_lossy(&a.stdout).into_owned();
    assert!(out.starts_with("the theme"), "{out}");
    assert!(stderr(&a).contains("generated in"), "{}", stderr(&a));
    let b = retort(&args, tmp.path());
    assert_eq!(String::from_utf8_lossy(&b.stdout), out, "same seed, same text");
    let batched = retort(&[&args[..], &["--batch", "3", "--top-k", "50"]].concat(), tmp.path());
    assert_eq!(batched.status.code(), Some(0), "{}", stderr(&batched));
    let text = String::from_utf8_lossy(&batched.stdout).into_owned();
    let samples: Vec<&str> = text.split("--- sample ").skip(1).collect();
    assert_eq!(samples.len(), 3, "{text}");
    let first = samples[0].split_once("---\n").expect("rule").1;
    let alone = retort(&[&args[..], &["--top-k", "50"]].concat(), tmp.path());
    assert_eq!(
        first,
        String::from_utf8_lossy(&alone.stdout),
        "sample 1 of a batch is the lone sample"
    );
    let greedy = retort(
        &["generate", "--model", g, "--prompt", "the", "--max-tokens", "3"],
        tmp.path(),
    );
    assert_eq!(greedy.status.code(), Some(0), "{}", stderr(&greedy));
}

#[test]
fn generate_refuses_what_is_not_a_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let o = retort(&["generate", "--model", "missing.gguf", "--prompt", "x"], tmp.path());
    assert_user_error(
        &o,
        &["--model missing.gguf", "neither a GGUF file nor a model directory"],
    );
    std::fs::write(tmp.path().join("config.json"), r#"{"model_type": "bert"}"#).expect("w");
    let o = retort(&["generate", "--model", ".", "--prompt", "x"], tmp.path());
    assert_user_error(&o, &["unsupported model_type"]);
    let o = retort(
        &["generate", "--model", ".", "--prompt", "x", "--temperature=-1"],
        tmp.path(),
    );
    assert_user_error(&o, &["--temperature"]);
}

#[test]
fn eval_reports_the_loss_of_a_model_file_on_text() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("tiny.gguf");
    retort_plugins::testing::write_tiny_gguf(&gguf, 262, candle_core::quantized::GgmlDType::F32, 1).expect("gguf");
    std::fs::write(tmp.path().join("t.txt"), "the theme of the thing. ".repeat(40)).expect("w");
    let g = gguf.to_str().expect("utf8");
    let o = retort(
        &[
            "eval",
            "--model",
            g,
            "--data",
            "t.txt",
            "--seq-len",
            "8",
            "--batches",
            "2",
            "--val-fraction",
            "1",
        ],
        tmp.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // 2 batches x 4 windows x 8 tokens; an untrained model is near log(262) = 5.57 nats.
    assert!(out.contains("tokens:     64"), "{out}");
    let loss: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("loss:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .expect("loss line");
    assert!(loss > 4.0 && loss < 7.0, "{loss}");
    let o = retort(&["eval", "--model", g, "--data", "missing.txt"], tmp.path());
    assert_user_error(&o, &["--data missing.txt"]);
}

#[test]
fn non_finite_numbers_are_refused_with_their_key_path() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml", "--set", "train.ema_decay=nan"], d.path());
    assert_user_error(&o, &["train.ema_decay", "finite", "--set train.ema_decay=nan"]);
    let o = retort(
        &[
            "check",
            "c.toml",
            "--set",
            "loss[0].weight={ kind = \"linear\", start = inf, end = 1.0 }",
        ],
        d.path(),
    );
    assert_user_error(&o, &["loss[0].weight.start", "finite", "--set loss[0].weight="]);
    let o = retort_env(
        &["check", "c.toml"],
        d.path(),
        &[("RETORT_TRAIN__WEIGHT_DECAY", "1.0e999")],
    );
    assert_user_error(&o, &["train.weight_decay", "finite", "RETORT_TRAIN__WEIGHT_DECAY"]);
    // An optional plugin param and an optional stage override in the file.
    let text = TINY.replace("context = 8\n[[loss]]", "context = 8\nlayer_norm_eps = nan\n[[loss]]");
    let f = setup(&text, Some(&corpus()));
    let line = line_of(&text, "layer_norm_eps", 0);
    assert_user_error(
        &retort(&["check", "c.toml"], f.path()),
        &["student.layer_norm_eps", "finite", &format!("c.toml:{line}")],
    );
    let text = format!("{TINY}[[stages]]\nsteps = 3\nweight_decay = -inf\n");
    let f = setup(&text, Some(&corpus()));
    let line = line_of(&text, "weight_decay", 0);
    assert_user_error(
        &retort(&["check", "c.toml"], f.path()),
        &["stages[0].weight_decay", "finite", &format!("c.toml:{line}")],
    );
}

#[test]
fn loss_weights_are_refused_below_zero_anywhere_over_training() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml", "--set", "loss[1].weight=-0.5"], d.path());
    assert_user_error(&o, &["loss[1].weight", ">= 0", "-0.5"]);
    let o = retort(
        &[
            "check",
            "c.toml",
            "--set",
            "loss[0].weight={ kind = \"linear\", start = 1.0, end = -1.0 }",
        ],
        d.path(),
    );
    assert_user_error(&o, &["loss[0].weight", ">= 0", "% of training"]);
    let text = format!("{TINY}[[stages]]\nsteps = 3\nloss_weights = {{ ce = -1.0 }}\n");
    let f = setup(&text, Some(&corpus()));
    assert_user_error(
        &retort(&["check", "c.toml"], f.path()),
        &["stages[0].loss_weights.ce", ">= 0"],
    );
}

#[test]
fn two_loss_terms_with_one_name_are_refused() {
    let text = format!("{TINY}[[loss]]\nkind = \"ce\"\nname = \"kl\"\n");
    let d = setup(&text, Some(&corpus()));
    let o = retort(&["check", "c.toml"], d.path());
    assert_user_error(&o, &["`kl`", "loss[0]", "loss[2]", "name = "]);
}

#[test]
fn environment_overrides_reach_list_elements_and_errors_name_their_source() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort_env(&["check", "c.toml"], d.path(), &[("RETORT_LOSS__0__TEMPERATURE", "3")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = retort_env(&["check", "c.toml"], d.path(), &[("RETORT_LOSS__0__TEMPERATURE", "-1")]);
    assert_user_error(&o, &["loss[0].temperature", "RETORT_LOSS__0__TEMPERATURE"]);
    let o = retort_env(&["check", "c.toml"], d.path(), &[("RETORT_LOSS__5__TEMPERATURE", "3")]);
    assert_user_error(&o, &["RETORT_LOSS__5__TEMPERATURE", "out of range"]);
    let o = retort(&["check", "c.toml", "--set", "bogus.x=1"], d.path());
    assert_user_error(&o, &["unknown field `bogus`", "--set bogus.x=1"]);
    let text = TINY.replace("batches = 1\nbatch_size = 2", "batches = 1\nbatch_size = 0");
    let f = setup(&text, Some(&corpus()));
    let line = line_of(&text, "batch_size", 1);
    assert_user_error(
        &retort(&["check", "c.toml"], f.path()),
        &["eval.batch_size", &format!("c.toml:{line})")],
    );
}

#[test]
fn number_or_schedule_values_say_what_they_accept() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml", "--set", "loss[0].weight=abc"], d.path());
    assert_user_error(
        &o,
        &[
            "loss[0].weight",
            "expected a number or a schedule table",
            "got a string \"abc\"",
            "--set loss[0].weight=abc",
        ],
    );
    let text = TINY.replace("temperature = 2.0", "temperature = { start = 3.0, end = 2.0 }");
    let f = setup(&text, Some(&corpus()));
    let line = line_of(&text, "temperature", 0);
    assert_user_error(
        &retort(&["check", "c.toml"], f.path()),
        &["loss[0].temperature", "without `kind`", &format!("c.toml:{line}")],
    );
}

#[test]
fn user_errors_show_no_backtrace_even_when_asked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("tiny.gguf");
    retort_plugins::testing::write_tiny_gguf(&gguf, 262, candle_core::quantized::GgmlDType::F32, 1).expect("gguf");
    let bytes = std::fs::read(&gguf).expect("read");
    std::fs::write(tmp.path().join("cut.gguf"), &bytes[..bytes.len() / 2]).expect("write");
    std::fs::write(tmp.path().join("t.txt"), "the theme of the thing. ".repeat(40)).expect("w");
    let o = retort_env(
        &["eval", "--model", "cut.gguf", "--data", "t.txt", "--seq-len", "8"],
        tmp.path(),
        &[("RUST_BACKTRACE", "1")],
    );
    assert_user_error(&o, &["cut.gguf"]);
    let err = stderr(&o);
    assert!(
        !err.contains("backtrace")
            && !err.contains("Error::bt")
            && !err.lines().any(|l| l.trim_start().starts_with("0: ")),
        "{err}"
    );
}

/// A text corpus tokenized with the tiny GGUF's tokenizer, which is also the teacher.
const GGUF_TEACHER: &str = r#"
[run]
name = "cache"
[data]
kind = "text"
path = "corpus.txt"
val_fraction = 0.2
tokenizer = { kind = "hf", path = "tiny.gguf" }
[teacher]
kind = "llama"
checkpoint = "tiny.gguf"
[student]
kind = "llama"
n_layer = 1
n_embd = 16
n_head = 2
context = 16
[train]
steps = 2
batch_size = 2
seq_len = 16
"#;

#[test]
fn cache_outputs_are_refused_the_same_way_as_run_outputs() {
    let d = setup(GGUF_TEACHER, Some(&"the theme of the thing. ".repeat(40)));
    let gguf = d.path().join("tiny.gguf");
    retort_plugins::testing::write_tiny_gguf(&gguf, 262, candle_core::quantized::GgmlDType::F32, 1).expect("gguf");
    std::fs::write(d.path().join("afile"), "x").expect("w");
    let o = retort(&["cache", "c.toml", "--out", "afile", "--k", "4", "--quiet"], d.path());
    assert_user_error(&o, &["afile", "not a directory"]);
    let o = retort(&["run", "c.toml", "--out", "afile", "--quiet"], d.path());
    assert_user_error(&o, &["afile", "not a directory"]);
    let o = retort(&["cache", "c.toml", "--out", "kc", "--batch", "0", "--quiet"], d.path());
    assert_user_error(&o, &["--batch", "expected an integer >= 1"]);
    std::fs::create_dir(d.path().join("models")).expect("mkdir");
    std::fs::write(d.path().join("models/header.json"), "mine").expect("w");
    std::fs::write(d.path().join("models/notes.txt"), "mine").expect("w");
    for force in [&[][..], &["--force"][..]] {
        let args = [
            &["cache", "c.toml", "--out", "models", "--k", "4", "--quiet"][..],
            force,
        ]
        .concat();
        let o = retort(&args, d.path());
        assert_user_error(&o, &["models", "notes.txt", "not a cache's"]);
    }
    assert_eq!(
        std::fs::read_dir(d.path().join("models")).expect("ls").count(),
        2,
        "nothing added"
    );
    assert_eq!(std::fs::read(d.path().join("models/header.json")).expect("r"), b"mine");

    let o = retort(&["cache", "c.toml", "--out", "kc", "--k", "4", "--quiet"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let export = ["cache", "export", "kc", "--out", "ex", "--windows", "2"];
    let o = retort(&export, d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ids = d.path().join("ex/ids.u32");
    std::fs::write(&ids, b"mine").expect("w");
    let o = retort(&export, d.path());
    assert_user_error(&o, &["ids.u32", "--force"]);
    assert_eq!(std::fs::read(&ids).expect("ids"), b"mine");
    let o = retort(&[&export[..], &["--force"]].concat(), d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read(&ids).expect("ids").len(), 2 * 16 * 4 * 4);
}

#[test]
fn plot_refuses_a_garbage_metrics_file_naming_its_line() {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(d.path().join("r")).expect("dir");
    std::fs::write(d.path().join("r/metrics.jsonl"), b"\n\xff\xfe garbage\n").expect("w");
    let o = retort(&["plot", "r"], d.path());
    assert_user_error(&o, &["metrics.jsonl:2"]);
}

#[test]
fn generate_and_eval_refuse_what_the_model_cannot_take() {
    let tmp = tempfile::tempdir().expect("tmp");
    let g = tmp.path().join("tiny.gguf");
    retort_plugins::testing::write_tiny_gguf(&g, 262, candle_core::quantized::GgmlDType::F32, 1).expect("gguf");
    let o = retort(
        &["generate", "--model", "tiny.gguf", "--prompt", "the", "--context", "0"],
        tmp.path(),
    );
    assert_user_error(&o, &["--context", ">= 1", "got 0"]);
    let small = tmp.path().join("small.gguf");
    retort_plugins::testing::write_tiny_gguf(&small, 100, candle_core::quantized::GgmlDType::F32, 1).expect("gguf");
    std::fs::write(tmp.path().join("t.txt"), "the theme of the thing. ".repeat(40)).expect("w");
    let o = retort(
        &[
            "eval",
            "--model",
            "small.gguf",
            "--data",
            "t.txt",
            "--seq-len",
            "8",
            "--val-fraction",
            "1",
        ],
        tmp.path(),
    );
    assert_user_error(&o, &["small.gguf", "100", "262"]);
    let o = retort(
        &["generate", "--model", "small.gguf", "--prompt", "the theme"],
        tmp.path(),
    );
    assert_user_error(&o, &["small.gguf", "100", "262"]);
    let o = retort(
        &["eval", "--model", "tiny.gguf", "--data", "t.txt", "--seq-len", "100000"],
        tmp.path(),
    );
    assert_user_error(&o, &["--seq-len", "lower --seq-len"]);
}

/// `retort check --ranks N` reports the data-parallel split and refuses a batch the ranks do
/// not divide; a launch of several ranks this build cannot join, or that `[parallel]` forbids,
/// is refused before anything is written.
#[test]
fn data_parallel_launches_are_checked_and_refused_clearly() {
    let d = setup(TINY, Some(&corpus()));
    let o = retort(&["check", "c.toml", "--ranks", "2"], d.path());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("parallel: 2 rank(s) (--ranks), 1 windows per rank of each batch, backend mpi"),
        "{out}"
    );
    let o = retort(&["check", "c.toml", "--ranks", "3"], d.path());
    assert_user_error(&o, &["train.batch_size", "is 2, not a multiple of the 3 ranks"]);
    let torchrun = [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let o = retort_env(&["run", "c.toml", "--out", "r"], d.path(), &torchrun);
    if cfg!(feature = "nccl") {
        // The CUDA build on a machine without a GPU: NCCL cannot open a device.
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("NCCL could not join rank 0 of 2"), "{}", stderr(&o));
    } else {
        assert_user_error(&o, &["without the `nccl` feature"]);
    }
    let ompi = [("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0")];
    let o = retort_env(
        &["run", "c.toml", "--out", "r", "--set", "parallel.backend=\"none\""],
        d.path(),
        &ompi,
    );
    assert_user_error(&o, &["parallel.backend", "mpirun (Open MPI) started 2 ranks"]);
    assert!(!d.path().join("r").exists(), "nothing written");
}

/// `student.dtype = "bf16"` on the CPU: a llama student trains with f32 master weights and
/// bf16 products where the CPU has AMX tiles (the report says so), and is refused with the
/// reason where it has none (or `RETORT_AMX=0`); f16 and a bf16 `transformer` student are
/// refused on the CPU.
#[test]
fn a_bf16_student_on_the_cpu_runs_on_amx_tiles_and_is_refused_elsewhere() {
    let d = setup(GGUF_TEACHER, Some(&"the theme of the thing. ".repeat(40)));
    retort_plugins::testing::write_tiny_gguf(
        &d.path().join("tiny.gguf"),
        262,
        candle_core::quantized::GgmlDType::F32,
        1,
    )
    .expect("gguf");
    let bf16 = ["run", "c.toml", "--quiet", "--set", "student.dtype=\"bf16\""];
    let o = retort_env(
        &[&bf16[..], &["--out", "off"]].concat(),
        d.path(),
        &[("RETORT_AMX", "0")],
    );
    assert_user_error(&o, &["student.dtype", "AMX", "RETORT_AMX=0"]);
    let o = retort(&[&bf16[..], &["--out", "on"]].concat(), d.path());
    if retort_plugins::kernels::cpu::bf16_matmul::tiles_available() {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let report = std::fs::read_to_string(d.path().join("on/report.json")).expect("report");
        assert!(report.contains("f32 master weights, bf16 products"), "{report}");
    } else {
        assert_user_error(&o, &["student.dtype", "AMX"]);
    }
    let o = retort(
        &[
            "run",
            "c.toml",
            "--quiet",
            "--out",
            "f16",
            "--set",
            "student.dtype=\"f16\"",
        ],
        d.path(),
    );
    assert_user_error(&o, &["student.dtype", "CUDA devices only"]);
    let t = setup(TINY, Some(&corpus()));
    let o = retort(
        &[
            "run",
            "c.toml",
            "--quiet",
            "--out",
            "t",
            "--set",
            "student.dtype=\"bf16\"",
        ],
        t.path(),
    );
    assert_user_error(&o, &["student.dtype", "only for llama students"]);
}
