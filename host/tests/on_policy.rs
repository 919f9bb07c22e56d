//! `[on_policy]` end to end: `lambda = 0` is the off-policy run bit for bit; on-policy steps
//! train on samples, report what they sampled, and the report compares the two students;
//! sequence-level KD samples from the teacher; bad values are refused with the key path.

use std::path::Path;

mod common;
use common::{assert_user_error, retort};

const BASE: &str = r#"
[run]
name = "op"
seed = 5

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

[[loss]]
kind = "reverse_kl"
weight = 0.5

[[loss]]
kind = "ce"
weight = 0.5

[train]
steps = 30
batch_size = 4
seq_len = 16
lr = 1e-2
log_every = 3
grad_accum = 2

[eval]
batches = 2
batch_size = 4
baseline = false
"#;

fn run(dir: &Path, name: &str, config: &str) -> std::path::PathBuf {
    std::fs::write(dir.join(format!("{name}.toml")), config).expect("config");
    let o = retort(&["run", &format!("{name}.toml"), "--out", name, "--quiet"], dir);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join(name)
}

/// The records of `event` of `phase`, without the fields that measure time.
fn records(run: &Path, event: &str, phase: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|m| m["event"] == event && m["phase"] == phase)
        .map(|mut m| {
            let o = m.as_object_mut().expect("object");
            o.remove("elapsed_s");
            o.remove("tokens_per_s");
            m
        })
        .collect()
}

fn model(run: &Path, phase: &str) -> Vec<u8> {
    std::fs::read(run.join(phase).join("model.safetensors")).expect("model")
}

#[test]
fn lambda_zero_trains_exactly_as_without_on_policy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let off = run(tmp.path(), "off", BASE);
    let zero = run(tmp.path(), "zero", &format!("{BASE}\n[on_policy]\nlambda = 0.0\n"));
    assert!(model(&off, "student") == model(&zero, "student"), "weights differ");
    let (a, b) = (records(&off, "train", "student"), records(&zero, "train", "student"));
    assert_eq!(a.len(), 10);
    assert_eq!(a, b);
    assert!(b.iter().all(|r| r.get("on_policy").is_none()), "no step sampled");
    assert!(!zero.join("offpolicy").exists(), "nothing to compare at lambda = 0");
}

#[test]
fn on_policy_steps_train_on_samples_and_the_report_compares_both_students() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = format!(
        "{BASE}\n[eval.generation]\nprompts = 16\n\n[on_policy]\nlambda = 0.5\nprompt_tokens = 6\nmax_new_tokens = 8\n"
    );
    let dir = run(tmp.path(), "on", &cfg);
    let train = records(&dir, "train", "student");
    let sampled: Vec<&serde_json::Value> = train.iter().filter_map(|r| r.get("on_policy")).collect();
    // Steps 2, 4, ..., 30 sample: 15 of 30, summed into the records every 3 steps.
    let steps: u64 = sampled.iter().map(|p| p["steps"].as_u64().expect("steps")).sum();
    assert_eq!(steps, 15, "{sampled:?}");
    for p in &sampled {
        // The synthetic tokenizer has no end of sequence: every sample runs to max_new_tokens.
        assert_eq!(p["completion_len"], 8.0, "{p}");
        assert_eq!(p["eos_rate"], 0.0, "{p}");
        let nll = p["sample_nll"].as_f64().expect("the teacher scores the samples");
        assert!(nll > 0.5 && nll < 16f64.ln() * 2.0, "{nll}");
        let share = p["generation_share"].as_f64().expect("share");
        assert!(share > 0.0 && share < 1.0, "{share}");
    }
    // The same run trained off-policy is the reference: same init and batches, other weights.
    let off = records(&dir, "train", "offpolicy");
    assert_eq!(off.len(), train.len());
    assert!(off.iter().all(|r| r.get("on_policy").is_none()));
    assert!(model(&dir, "student") != model(&dir, "offpolicy"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report")).expect("json");
    assert!(report["off_policy"]["val_loss"].as_f64().is_some(), "{report}");
    // Every model's generations are scored by the teacher and by the synthetic source itself.
    for who in ["teacher", "student", "off_policy"] {
        let g = &report[who]["generation"];
        assert_eq!(g["samples"], 16, "{who}: {g}");
        assert_eq!(g["completion_len"], 8.0, "{who}: {g}");
        for score in ["teacher_nll", "true_nll"] {
            let x = g[score].as_f64().unwrap_or_else(|| panic!("{who}: no {score} in {g}"));
            assert!(x > 0.0 && x < 2.0 * 16f64.ln(), "{who} {score}: {x}");
        }
    }
    let md = std::fs::read_to_string(dir.join("report.md")).expect("md");
    assert!(
        md.contains("student (on-policy)") && md.contains("student (off-policy)") && md.contains("## Generations"),
        "{md}"
    );
}

#[test]
fn sequence_level_kd_trains_on_the_teachers_samples() {
    let tmp = tempfile::tempdir().expect("tmp");
    let student = run(
        tmp.path(),
        "student_samples",
        &format!("{BASE}\n[on_policy]\nlambda = 1.0\ncompare_off_policy = false\n"),
    );
    let teacher = run(
        tmp.path(),
        "teacher_samples",
        &format!("{BASE}\n[on_policy]\nlambda = 1.0\nseq_kd = true\ncompare_off_policy = false\n"),
    );
    assert!(model(&student, "student") != model(&teacher, "student"));
    let nll = |dir: &Path| -> f64 {
        let r = records(dir, "train", "student");
        let last = r.last().expect("a record");
        last["on_policy"]["sample_nll"].as_f64().expect("nll")
    };
    // The teacher finds its own samples likelier than those of a 1-layer student.
    assert!(nll(&teacher) < nll(&student), "{} vs {}", nll(&teacher), nll(&student));
}

#[test]
fn bad_on_policy_values_are_refused_with_their_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (section, needles) in [
        ("lambda = 1.5", &["on_policy.lambda", "[0, 1]"][..]),
        ("lambda = -0.1", &["on_policy.lambda"]),
        (
            "prompt_tokens = 0",
            &["on_policy.prompt_tokens", "[1, train.seq_len = 16]"],
        ),
        ("prompt_tokens = 17", &["on_policy.prompt_tokens"]),
        (
            "prompt_tokens = 10\nmax_new_tokens = 8",
            &["on_policy.max_new_tokens", "= 7]"],
        ),
        ("temperature = -1.0", &["on_policy.temperature"]),
        ("top_p = 0.0", &["on_policy.top_p"]),
        ("lamda = 0.5", &["on_policy.lamda", "lambda"]),
        (
            "[eval.generation]\nprompts = 0",
            &["eval.generation.prompts", "[1, 125]"],
        ),
        ("[eval.generation]\nprompts = 126", &["eval.generation.prompts"]),
        (
            "[eval.generation]\nmax_new_tokens = 10",
            &["eval.generation.max_new_tokens", "= 9]"],
        ),
    ] {
        std::fs::write(tmp.path().join("c.toml"), format!("{BASE}\n[on_policy]\n{section}\n")).expect("config");
        let o = retort(&["check", "c.toml"], tmp.path());
        assert_user_error(&o, needles);
        assert!(!tmp.path().join("runs").exists());
    }
}

#[test]
fn the_sampled_reverse_kl_trains_only_on_the_students_own_samples() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sampled = BASE.replace("kind = \"reverse_kl\"", "kind = \"sampled_reverse_kl\"");
    assert_ne!(sampled, BASE);
    for (on_policy, needles) in [
        (
            "",
            &["loss[0]", "sampled_reverse_kl", "there is no [on_policy] section"][..],
        ),
        ("[on_policy]\nlambda = 0.5", &["loss[0]", "on_policy_lambda) < 1"]),
        (
            "[on_policy]\nlambda = 1.0\nseq_kd = true",
            &["loss[0]", "samples from the teacher"],
        ),
    ] {
        std::fs::write(tmp.path().join("c.toml"), format!("{sampled}\n{on_policy}\n")).expect("config");
        assert_user_error(&retort(&["check", "c.toml"], tmp.path()), needles);
    }
    let dir = run(
        tmp.path(),
        "srkl",
        &format!("{sampled}\n[on_policy]\nlambda = 1.0\ncompare_off_policy = false\n"),
    );
    let train = records(&dir, "train", "student");
    assert!(train.iter().all(|r| r["on_policy"]["steps"] == 3), "every step samples");
    let value = |r: &serde_json::Value| r["terms"]["sampled_reverse_kl"].as_f64().expect("term");
    assert!(train.iter().all(|r| value(r).is_finite()));
}

#[test]
fn stages_set_their_own_fraction_of_steps_on_samples() {
    let tmp = tempfile::tempdir().expect("tmp");
    let stages = "[[stages]]\nname = \"data\"\nsteps = 12\non_policy_lambda = 0.0\n\n\
                  [[stages]]\nname = \"samples\"\nsteps = 18\non_policy_lambda = 1.0\n";
    let dir = run(
        tmp.path(),
        "staged",
        &format!("{BASE}\n{stages}\n[on_policy]\nlambda = 0.5\ncompare_off_policy = false\n"),
    );
    let train = records(&dir, "train", "student");
    let sampled = |stage: &str| -> u64 {
        let of_stage = train.iter().filter(|r| r["stage"] == stage);
        of_stage.filter_map(|r| r["on_policy"]["steps"].as_u64()).sum()
    };
    assert_eq!(sampled("data"), 0, "{train:?}");
    assert_eq!(sampled("samples"), 18, "{train:?}");
    std::fs::write(tmp.path().join("c.toml"), format!("{BASE}\n{stages}\n")).expect("config");
    assert_user_error(
        &retort(&["check", "c.toml"], tmp.path()),
        &["stages[0].on_policy_lambda", "[on_policy]"],
    );
    let bad = stages.replace("on_policy_lambda = 1.0", "on_policy_lambda = 2.0");
    std::fs::write(tmp.path().join("c.toml"), format!("{BASE}\n{bad}\n[on_policy]\n")).expect("config");
    assert_user_error(
        &retort(&["check", "c.toml"], tmp.path()),
        &["stages[1].on_policy_lambda", "[0, 1]"],
    );
}

#[test]
fn a_teacher_read_from_a_logit_cache_cannot_score_samples() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = run(tmp.path(), "teach", BASE);
    let data = &BASE[BASE.find("[data]").expect("data")..BASE.find("[teacher]").expect("teacher")];
    let teacher = dir.join("teacher").display().to_string();
    let cache = format!(
        "{data}[teacher]\nkind = \"transformer\"\ncheckpoint = \"{teacher}\"\n\
         [train]\nseq_len = 16\n"
    );
    std::fs::write(tmp.path().join("t.toml"), cache).expect("config");
    let o = retort(&["cache", "t.toml", "--out", "cache", "--k", "8"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let cached = format!(
        "{data}[teacher]\nkind = \"cached\"\npath = \"cache\"\n\
         [student]\nkind = \"transformer\"\nn_layer = 1\nn_embd = 16\nn_head = 2\ncontext = 16\n\
         [[loss]]\nkind = \"topk_kl\"\nk = 8\n[train]\nsteps = 2\nbatch_size = 4\nseq_len = 16\n"
    );
    std::fs::write(
        tmp.path().join("c.toml"),
        format!("{cached}\n[on_policy]\nlambda = 0.5\n"),
    )
    .expect("config");
    assert_user_error(
        &retort(&["check", "c.toml"], tmp.path()),
        &["on_policy", "cannot score sampled sequences"],
    );
    // Without [on_policy] the same config is accepted.
    std::fs::write(tmp.path().join("c.toml"), &cached).expect("config");
    let o = retort(&["check", "c.toml"], tmp.path());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A `jsonl` source with a `prompt_field`: on-policy steps and the generation evaluation
/// continue the data's prompts (of several lengths), not the starts of windows.
#[test]
fn prompts_given_by_the_data_are_continued() {
    let tmp = tempfile::tempdir().expect("tmp");
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let prompt: String = (0..3 + i % 7).map(|j| ['q', 'r', 's'][(i + j) % 3]).collect();
            let text: String = (0..30).map(|j| ['a', 'b', 'c', 'd'][(i * j + j / 3) % 4]).collect();
            serde_json::json!({"prompt": prompt, "text": text}).to_string()
        })
        .collect();
    std::fs::write(tmp.path().join("d.jsonl"), lines.join("\n")).expect("data");
    let data = "[data]\nkind = \"jsonl\"\npath = \"d.jsonl\"\nprompt_field = \"prompt\"\nseparator = \"|\"\n";
    let synthetic = BASE[BASE.find("[data]").expect("data")..BASE.find("[teacher]").expect("teacher")].to_string();
    let base = BASE.replace(&synthetic, &format!("{data}\n"));
    let on_policy = "[on_policy]\nlambda = 1.0\nprompt_tokens = 6\nmax_new_tokens = 5\n";
    let cfg = format!("{base}\n[eval.generation]\nprompts = 4\n\n{on_policy}");
    std::fs::write(tmp.path().join("c.toml"), &cfg).expect("config");
    let o = retort(&["check", "c.toml"], tmp.path());
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}");
    // 36 training prompts of 3..9 characters, each cut to its last 6.
    assert!(out.contains("the data's prompts (36 of"), "{out}");
    let dir = run(tmp.path(), "p", &cfg);
    let train = records(&dir, "train", "student");
    let sampled: Vec<&serde_json::Value> = train.iter().filter_map(|r| r.get("on_policy")).collect();
    let steps: u64 = sampled.iter().map(|p| p["steps"].as_u64().expect("steps")).sum();
    assert_eq!(steps, 30);
    assert!(sampled.iter().all(|p| p["completion_len"] == 5.0), "{sampled:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report")).expect("json");
    assert_eq!(report["student"]["generation"]["samples"], 4, "{report}");
    // The evaluation asks at most the validation prompts the data gives.
    let too_many = cfg.replace("prompts = 4", "prompts = 5");
    std::fs::write(tmp.path().join("c.toml"), too_many).expect("config");
    assert_user_error(
        &retort(&["check", "c.toml"], tmp.path()),
        &[
            "eval.generation.prompts",
            "the data gives 4 non-empty validation prompts",
        ],
    );
}
