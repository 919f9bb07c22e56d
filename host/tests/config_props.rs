//! Property tests of the config loader: whatever the text of a TOML, YAML or JSON config file
//! and whatever the `--set` overrides, `load` returns a config or a user error (exit code 2)
//! that names where the fault is (the file or the `--set`), and never panics.

use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;

use retort_core::Error;
use retort_host::assemble::config::{load, QUICKSTART_TOML};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

/// Success, or a user error whose message contains `names`.
fn refused_naming(result: Result<impl Sized, Error>, names: &str) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        let msg = e.to_string();
        prop_assert_eq!(e.exit_code(), 2, "not a user error: {}", msg);
        prop_assert!(msg.contains(names), "the error does not name {}: {}", names, msg);
    }
    Ok(())
}

/// Loads `text` as a config file named `name` (the extension picks the format).
fn load_text(dir: &Path, name: &str, text: &str, sets: &[String]) -> Result<(), TestCaseError> {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    let result = load(Some(&path), sets);
    if sets.is_empty() {
        refused_naming(result, name)
    } else {
        refused_naming(result, "")
    }
}

/// Text made of the characters that configs are made of.
fn config_text() -> impl Strategy<Value = String> {
    prop_oneof!["[\\[\\]{}a-z_.=:,\"'#0-9 \\n\\t-]{0,200}", any::<String>(),]
}

/// An edit of a config's text.
#[derive(Debug, Clone)]
enum Edit {
    /// Insert text at a point.
    Insert(Index, String),
    /// Delete a short range.
    Delete(Index, usize),
    /// Repeat a line (duplicate keys, tables).
    RepeatLine(Index),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let snippet = prop_oneof![
        "[\\[\\]{}=\",.#\\n]",
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("18446744073709551616".to_string()),
        Just("nan".to_string()),
        Just("\"\"".to_string()),
        Just("[[loss]]\n".to_string()),
        Just("x = ".to_string()),
        Just("{a = [{b = 1}]}".to_string()),
    ];
    let edit = prop_oneof![
        (any::<Index>(), snippet).prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<Index>().prop_map(Edit::RepeatLine),
    ];
    prop::collection::vec(edit, 1..4)
}

/// `text` with `edits` applied (at character boundaries).
fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        match e {
            Edit::Insert(i, s) => {
                let at = i.index(chars.len() + 1);
                chars.splice(at..at, s.chars());
            }
            Edit::Delete(i, n) if !chars.is_empty() => {
                let at = i.index(chars.len());
                let end = (at + n).min(chars.len());
                chars.drain(at..end);
            }
            Edit::RepeatLine(i) => {
                let s: String = chars.iter().collect();
                let lines: Vec<&str> = s.lines().collect();
                if !lines.is_empty() {
                    let k = i.index(lines.len());
                    let mut out: Vec<&str> = lines[..=k].to_vec();
                    out.extend_from_slice(&lines[k..]);
                    chars = out.join("\n").chars().collect();
                }
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// A `--set`: a key path of config-like pieces and a value, or any string.
fn set_arg() -> impl Strategy<Value = String> {
    let key = "(train|loss\\[[0-9]{1,3}\\]|data|run|[a-z]{1,4}|\\[[0-9]\\]|)(\\.[a-z_]{0,5}|\\[[0-9a-z]{0,3}\\]){0,4}";
    let value = prop_oneof![
        "[0-9a-z.\\[\\]{}\",=-]{0,12}",
        Just("-1".to_string()),
        Just("1e999".to_string()),
        Just("18446744073709551616".to_string()),
        Just("[1, [2, [3]]]".to_string()),
        Just("{ kind = \"kl\" }".to_string()),
    ];
    prop_oneof![
        3 => (key, value).prop_map(|(k, v)| format!("{k}={v}")),
        1 => any::<String>(),
    ]
}

#[test]
fn a_deep_set_key_is_refused_not_a_stack_overflow() {
    let deep = format!("loss[0].params{}=1", ".x".repeat(100_000));
    let err = load(None, &[deep]).expect_err("refused");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--set"), "{err}");
}

#[test]
fn deeply_nested_config_files_are_refused_not_a_stack_overflow() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 1_000;
    for (name, text) in [
        ("deep.toml", format!("x = {}{}", "[".repeat(n), "]".repeat(n))),
        ("deep.json", format!("{{\"x\": {}{}}}", "[".repeat(n), "]".repeat(n))),
        ("deep.yaml", format!("x: {}{}", "[".repeat(n), "]".repeat(n))),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let err = load(Some(&path), &[]).expect_err("refused");
        assert_eq!(err.exit_code(), 2, "{name}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary text as a TOML, YAML or JSON config file.
    #[test]
    fn arbitrary_config_files_are_refused_naming_the_file(text in config_text(), ext in prop::sample::select(vec!["toml", "yaml", "json"])) {
        let dir = tempfile::tempdir().expect("tmp");
        load_text(dir.path(), &format!("c.{ext}"), &text, &[])?;
    }

    /// The quickstart config, damaged: refused naming the file, or it loads.
    #[test]
    fn damaged_configs_are_refused_naming_the_file(edits in edits()) {
        let dir = tempfile::tempdir().expect("tmp");
        load_text(dir.path(), "quick.toml", &apply(QUICKSTART_TOML, &edits), &[])?;
    }

    /// The quickstart config as JSON, damaged.
    #[test]
    fn damaged_json_configs_are_refused_naming_the_file(edits in edits()) {
        let dir = tempfile::tempdir().expect("tmp");
        let table: toml::Table = toml::from_str(QUICKSTART_TOML).expect("toml");
        let json = serde_json::to_string_pretty(&table).expect("json");
        load_text(dir.path(), "quick.json", &apply(&json, &edits), &[])?;
    }

    /// Arbitrary `--set` overrides of the quickstart: refused naming `--set`... or the key.
    #[test]
    fn arbitrary_sets_are_refused_as_user_errors(sets in prop::collection::vec(set_arg(), 1..4)) {
        refused_naming(load(None, &sets), "--set")?;
    }
}
