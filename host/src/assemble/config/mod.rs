//! Loading a run config: a file (TOML, YAML or JSON) or the built-in quickstart, then
//! `RETORT_*` environment variables (`RETORT_TRAIN__STEPS=100` sets `train.steps`,
//! `RETORT_LOSS__0__TEMPERATURE=3` the first loss term's temperature), then `--set
//! key.path=value` overrides (`--set loss[1].temperature=3`). Every number must be finite.
//!
//! Errors name the key path and where the offending value came from: the file and line, the
//! environment variable, or the `--set` argument.

mod finite;
mod locate;
mod overrides;
mod tables;

use std::path::Path;

use figment::providers::{Format, Json, Toml, Yaml};
use figment::value::{Dict, Value};
use figment::Figment;

use retort_core::config::RunConfig;
use retort_core::{Error, Result};

pub use locate::ConfigOrigin;
pub use overrides::EnvOverride;

/// The built-in quickstart config (`examples/configs/quickstart.toml`).
pub const QUICKSTART_TOML: &str = include_str!("../../../../examples/configs/quickstart.toml");

/// Loads the config from `file` (or the quickstart), the process's `RETORT_*` variables and
/// `sets`.
pub fn load(file: Option<&Path>, sets: &[String]) -> Result<(RunConfig, ConfigOrigin)> {
    load_with_env(file, &EnvOverride::from_process(), sets)
}

/// Loads the config from `file` (or the quickstart), then `env`, then `sets`.
pub fn load_with_env(file: Option<&Path>, env: &[EnvOverride], sets: &[String]) -> Result<(RunConfig, ConfigOrigin)> {
    let (fig, toml_text) = file_figment(file)?;
    let origin = ConfigOrigin {
        file: file.map(Path::to_path_buf),
        toml_text,
        sets: sets.to_vec(),
        env: env.to_vec(),
    };
    let mut tree: Value = fig
        .extract()
        .map_err(|e| Error::input(origin_label(file), e.to_string().replace("\n", " ")))?;
    if matches!(tree, Value::Empty(..)) {
        tree = Dict::new().into();
    }
    if !matches!(tree, Value::Dict(..)) {
        return Err(Error::input(
            origin_label(file),
            "the top level must be a table of sections",
        ));
    }
    for e in env {
        e.apply(&mut tree)?;
    }
    for s in sets {
        overrides::apply_set(&mut tree, s)?;
    }
    finite::check(&tree).map_err(|e| origin.annotate(e))?;
    let value = serde_json::to_value(&tree).map_err(|e| Error::failed("converting the config", e))?;
    let as_json = |cfg: &RunConfig| serde_json::to_value(cfg).map_err(|e| Error::failed("converting the config", e));
    let cfg = match serde_path_to_error::deserialize::<_, RunConfig>(value.clone()) {
        Ok(cfg) => cfg,
        Err(e) => {
            // A list given for a section fails inside it, at a confusing place: say so first.
            tables::check(&value, &as_json(&RunConfig::default())?).map_err(|e| origin.annotate(e))?;
            let path = e.path().to_string();
            return Err(origin.annotate(Error::config(path, e.into_inner().to_string())));
        }
    };
    tables::check(&value, &as_json(&cfg)?).map_err(|e| origin.annotate(e))?;
    Ok((cfg, origin))
}

/// `config file X`, or the built-in quickstart.
fn origin_label(file: Option<&Path>) -> String {
    match file {
        Some(f) => format!("config file {}", f.display()),
        None => "built-in quickstart config".to_string(),
    }
}

/// The file's (or the quickstart's) figment, and its text when it is TOML.
fn file_figment(file: Option<&Path>) -> Result<(Figment, Option<String>)> {
    let Some(path) = file else {
        let fig = Figment::new().merge(Toml::string(QUICKSTART_TOML));
        return Ok((fig, Some(QUICKSTART_TOML.to_string())));
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::input_failed(origin_label(file), "cannot read", e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match ext.as_str() {
        "toml" => (Figment::new().merge(Toml::string(&text)), Some(text)),
        "yaml" | "yml" => (Figment::new().merge(Yaml::string(&text)), None),
        "json" => (Figment::new().merge(Json::string(&text)), None),
        _ => {
            return Err(Error::input(
                origin_label(file),
                "unknown format: expected a .toml, .yaml, .yml or .json file",
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn quickstart_parses() {
        let (cfg, _) = load(None, &[]).expect("quickstart");
        assert!(!cfg.loss.is_empty());
    }

    #[test]
    fn sets_override_nested_and_indexed_keys() {
        let (cfg, _) = load(
            None,
            &[
                "train.steps=7".into(),
                "loss[0].temperature=3.5".into(),
                "eval.baseline=false".into(),
            ],
        )
        .expect("load");
        assert_eq!(cfg.train.steps, 7);
        assert_eq!(cfg.loss[0].params["temperature"], serde_json::json!(3.5));
        assert!(!cfg.eval.baseline);
        let err = load(None, &["loss[9].weight=1".into()]).expect_err("must fail");
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn type_error_names_key_path_file_and_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(
            dir.path(),
            "c.toml",
            "[run]\nname = \"x\"\n\n[train]\nsteps = \"many\"\n",
        );
        let err = load(Some(&p), &[]).expect_err("must fail");
        let msg = err.to_string();
        assert_eq!(err.exit_code(), 2);
        assert!(msg.contains("`train.steps`") && msg.contains("c.toml:5"), "{msg}");
    }

    #[test]
    fn unknown_key_in_array_of_tables_gets_its_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(
            dir.path(),
            "c.toml",
            "[[loss]]\nkind = \"kl\"\n\n[[loss]]\nkind = \"ce\"\nwieght = 2\n",
        );
        let (_, origin) = load(Some(&p), &[]).expect("loss params are checked by plugins");
        assert!(
            origin.locate("loss[1].wieght").ends_with("c.toml:6"),
            "{}",
            origin.locate("loss[1].wieght")
        );
    }

    #[test]
    fn set_errors_point_at_the_set() {
        let err = load(None, &["train.steps=abc".into()])
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("train.steps") && err.contains("--set train.steps=abc"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_reach_list_elements_before_sets() {
        let env: Vec<EnvOverride> = [("RETORT_LOSS__0__TEMPERATURE", "3"), ("RETORT_TRAIN__STEPS", "9")]
            .iter()
            .filter_map(|(k, v)| EnvOverride::new(k, v))
            .collect();
        let (cfg, _) = load_with_env(None, &env, &["train.steps=7".into()]).expect("load");
        assert_eq!(cfg.loss[0].params["temperature"], serde_json::json!(3));
        assert_eq!(cfg.loss.len(), 2);
        assert_eq!(cfg.train.steps, 7);
        let env: Vec<EnvOverride> = EnvOverride::new("RETORT_TRAIN__STEPS", "x").into_iter().collect();
        let err = load_with_env(None, &env, &[]).expect_err("type").to_string();
        assert!(
            err.contains("`train.steps`") && err.contains("RETORT_TRAIN__STEPS"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_numbers_are_config_errors_where_they_were_set() {
        let err = load(None, &["train.ema_decay=nan".into()]).expect_err("nan");
        assert_eq!(err.exit_code(), 2);
        let msg = err.to_string();
        assert!(
            msg.contains("`train.ema_decay`") && msg.contains("--set train.ema_decay=nan"),
            "{msg}"
        );
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(
            dir.path(),
            "c.yaml",
            "student:\n  kind: transformer\n  init_std: .inf\n",
        );
        let msg = load(Some(&p), &[]).expect_err("inf").to_string();
        assert!(msg.contains("`student.init_std`") && msg.contains("c.yaml"), "{msg}");
    }

    #[test]
    fn missing_file_and_bad_extension_are_input_errors() {
        let err = load(Some(Path::new("/nonexistent/x.toml")), &[]).expect_err("must fail");
        assert_eq!(err.exit_code(), 2);
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(dir.path(), "c.ini", "");
        assert!(load(Some(&p), &[])
            .expect_err("must fail")
            .to_string()
            .contains("unknown format"));
    }

    #[test]
    fn a_section_given_as_a_list_is_refused_not_read_positionally() {
        let err = load(None, &["train=[1, 2]".into()]).expect_err("list").to_string();
        assert!(err.contains("`train`: expected a table of keys, got a list"), "{err}");
        let d = tempfile::tempdir().expect("tmp");
        let file = d.path().join("c.toml");
        std::fs::write(&file, "[train]\nsteps = 3\n[[eval]]\nbatches = 1\n").expect("w");
        let err = load(Some(&file), &[]).expect_err("array of tables").to_string();
        assert!(
            err.contains("`eval`: expected a table of keys") && err.contains("c.toml:3"),
            "{err}"
        );
    }
}
