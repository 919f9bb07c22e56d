//! Tokenizer identity between the data and a loaded teacher, for a model kind whose checkpoint
//! is a plain Hugging Face directory (`transformer`) and for a character-level tokenizer.

use std::path::Path;
use std::process::Output;

mod common;
use common::{assert_user_error, retort};

const CONFIG: &str = concat!(
    r#"
[run]
name = "tok"
[data]
kind = "text"
path = "corpus.txt"
"#,
    tiny_models!()
);

/// A run on `corpus` whose pretrained teacher lands in `<dir>/first/teacher`.
fn pretrained_teacher(dir: &Path, corpus: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("corpus.txt"), corpus).expect("corpus");
    std::fs::write(dir.join("c.toml"), CONFIG).expect("config");
    let o = retort(&["run", "c.toml", "--out", "first", "--quiet"], dir);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("first/teacher")
}

/// `check` of the config with the teacher loaded from `first/teacher`, on `corpus`.
fn check_with_teacher(dir: &Path, corpus: &str) -> Output {
    std::fs::write(dir.join("corpus.txt"), corpus).expect("corpus");
    retort(&["check", "c.toml", "--set", "teacher.checkpoint=first/teacher"], dir)
}

const WIDE: &str = "To be, or not to be: that is the question! Whether 'tis nobler in the mind to suffer?\n";
const NARROW: &str = "to be or not to be that is the question whether tis nobler in the mind to suffer\n";

#[test]
fn a_character_teacher_trained_on_other_characters_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let teacher = pretrained_teacher(d.path(), &WIDE.repeat(20));
    assert!(teacher.join("retort_tokenizer.json").is_file());
    let o = check_with_teacher(d.path(), &WIDE.repeat(30));
    assert_eq!(
        o.status.code(),
        Some(0),
        "same characters: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Fewer distinct characters: once narrowed as "padding", now refused naming both sides.
    assert_user_error(
        &check_with_teacher(d.path(), &NARROW.repeat(20)),
        &["teacher's tokenizer `char:", "data's tokenizer `char:"],
    );
}

#[test]
fn a_teacher_whose_checkpoint_carries_another_tokenizer_json_is_refused() {
    let d = tempfile::tempdir().expect("tmp");
    let teacher = pretrained_teacher(d.path(), &WIDE.repeat(20));
    let vocab: serde_json::Map<String, serde_json::Value> = ["a", "b", "c", "[UNK]"]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i.into()))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    std::fs::write(teacher.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer.json");
    assert_user_error(
        &check_with_teacher(d.path(), &WIDE.repeat(20)),
        &["teacher's tokenizer `bpe:4:"],
    );
}

#[test]
fn padding_is_not_assumed_for_a_checkpoint_that_names_no_tokenizer() {
    let d = tempfile::tempdir().expect("tmp");
    let teacher = pretrained_teacher(d.path(), &WIDE.repeat(20));
    std::fs::remove_file(teacher.join("retort_tokenizer.json")).expect("rm");
    let o = check_with_teacher(d.path(), &WIDE.repeat(30));
    assert_eq!(
        o.status.code(),
        Some(0),
        "same size: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_user_error(
        &check_with_teacher(d.path(), &NARROW.repeat(20)),
        &["nothing proves that rows"],
    );
}
