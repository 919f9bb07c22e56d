//! Loading a run config: a file (TOML, YAML or JSON) or the built-in quickstart, merged by
//! figment with `RETORT_*` environment variables (`RETORT_TRAIN__STEPS=100` sets
//! `train.steps`), then `--set key.path=value` overrides (`--set loss[1].temperature=3`).
//!
//! Errors name the key path and where the offending value came from: the file and line, the
//! environment variable, or the `--set` argument.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Json, Toml, Yaml};
use figment::Figment;
use serde_json::{Map, Value};

use retort_core::config::RunConfig;
use retort_core::{Error, Result};

/// The built-in quickstart config (`examples/configs/quickstart.toml`).
pub const QUICKSTART_TOML: &str = include_str!("../../../examples/configs/quickstart.toml");

/// Environment variables with the `RETORT_` prefix that are not config keys.
const NON_CONFIG_ENV: &[&str] = &["log", "plugin_path"];

/// Where the config came from, for locating errors.
#[derive(Debug, Clone)]
pub struct ConfigOrigin {
    /// The file, or `None` for the built-in quickstart.
    pub file: Option<PathBuf>,
    /// Its text (TOML files only; used for line numbers).
    toml_text: Option<String>,
    /// `--set` overrides as given.
    pub sets: Vec<String>,
    /// Config keys set from the environment.
    pub env_keys: Vec<String>,
}

impl ConfigOrigin {
    /// The config file's path, or `built-in quickstart config`.
    pub fn label(&self) -> String {
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "built-in quickstart config".to_string(),
        }
    }

    /// A human location of key path `path`: `--set ...`, `env RETORT_...`, or `file:line`.
    pub fn locate(&self, path: &str) -> String {
        let norm = |s: &str| s.replace('[', ".").replace(']', "");
        let key = norm(path);
        let within = |p: &str| key == p || key.starts_with(&format!("{p}."));
        // A `--set` that wrote the key or a table above it; else one that wrote below it (an
        // unknown key `a` from `--set a.b=1`).
        let set_key = |s: &&String| s.split_once('=').map(|(k, _)| norm(k.trim()));
        let below = |p: &str| p.starts_with(&format!("{key}."));
        if let Some(s) = (self.sets.iter().rev().find(|s| set_key(s).is_some_and(|k| within(&k))))
            .or_else(|| self.sets.iter().rev().find(|s| set_key(s).is_some_and(|k| below(&k))))
        {
            return format!("set by --set {s}");
        }
        if let Some(k) = self.env_keys.iter().find(|k| within(k)) {
            return format!(
                "set by environment variable RETORT_{}",
                k.to_uppercase().replace('.', "__")
            );
        }
        let name = self.label();
        match self.toml_text.as_deref().and_then(|t| toml_line(t, path)) {
            Some(line) => format!("{name}:{line}"),
            None => name,
        }
    }

    /// Adds the location to a config error.
    pub fn annotate(&self, err: Error) -> Error {
        match err {
            Error::Config { path, message } => {
                let loc = self.locate(&path);
                Error::Config {
                    message: format!("{message} ({loc})"),
                    path,
                }
            }
            Error::UnknownKind {
                category,
                kind,
                path,
                known,
                ..
            } => {
                let location = format!(" ({})", self.locate(&path));
                Error::UnknownKind {
                    category,
                    kind,
                    path,
                    known,
                    location,
                }
            }
            other => other,
        }
    }
}

/// Splits `a.b[2].c` into segments; `None` for a malformed path.
fn path_segments(path: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (name, rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() {
            return None;
        }
        out.push(Segment::Key(name.to_string()));
        let mut rest = rest;
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            out.push(Segment::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(out)
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// 1-based line of the deepest existing prefix of `path` in TOML `text`.
fn toml_line(text: &str, path: &str) -> Option<usize> {
    use toml_edit::{Item, Value as TV};
    let doc = toml_edit::ImDocument::parse(text.to_string()).ok()?;
    let segs = path_segments(path)?;
    let mut span: Option<std::ops::Range<usize>> = None;
    enum Node<'a> {
        Item(&'a Item),
        Value(&'a TV),
        Table(&'a toml_edit::Table),
    }
    let mut node = Node::Table(doc.as_table());
    for seg in segs {
        node = match (seg, node) {
            (Segment::Key(k), Node::Table(t)) => {
                let (key, item) = t.get_key_value(&k)?;
                span = key.span().or(item.span()).or(span);
                Node::Item(item)
            }
            (Segment::Key(k), Node::Item(item)) => {
                let t = item.as_table_like()?;
                let (key, item) = t.get_key_value(&k)?;
                span = key.span().or(item.span()).or(span);
                Node::Item(item)
            }
            (Segment::Key(k), Node::Value(TV::InlineTable(t))) => {
                let (key, item) = t.get_key_value(&k)?;
                span = key.span().or(item.span()).or(span);
                Node::Item(item)
            }
            (Segment::Index(i), Node::Item(Item::ArrayOfTables(a))) => {
                let t = a.get(i)?;
                span = t.span().or(span);
                Node::Table(t)
            }
            (Segment::Index(i), Node::Item(Item::Value(TV::Array(a))))
            | (Segment::Index(i), Node::Value(TV::Array(a))) => {
                let v = a.get(i)?;
                span = v.span().or(span);
                Node::Value(v)
            }
            _ => break,
        };
    }
    let start = span?.start;
    Some(text[..start.min(text.len())].matches('\n').count() + 1)
}

/// Parses the value of a `--set`: a TOML value (`3`, `2.5`, `true`, `"x"`, `[1, 2]`), else a
/// bare string.
fn parse_set_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t
            .remove("v")
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Most parts of a `--set` key path (a deeper one would nest values past what the stack holds).
const MAX_SET_DEPTH: usize = 32;

/// Applies one `key.path=value` to `root`.
fn apply_set(root: &mut Value, set: &str) -> Result<()> {
    let usage = |m: String| Error::config("--set", m);
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| usage(format!("expected KEY=VALUE, got `{set}`")))?;
    let segs = path_segments(key.trim()).ok_or_else(|| usage(format!("malformed key path `{key}`")))?;
    if segs.len() > MAX_SET_DEPTH {
        return Err(usage(format!(
            "key path of {} parts (at most {MAX_SET_DEPTH}): `{}...`",
            segs.len(),
            key.chars().take(40).collect::<String>()
        )));
    }
    let value = parse_set_value(raw.trim());
    let mut node = root;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        node = match seg {
            Segment::Key(k) => {
                if !node.is_object() {
                    return Err(usage(format!("`{key}`: `{k}` is inside a value that is not a table")));
                }
                let obj = node.as_object_mut().expect("checked is_object");
                if last {
                    obj.insert(k.clone(), value);
                    return Ok(());
                }
                obj.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()))
            }
            Segment::Index(idx) => {
                let arr = node
                    .as_array_mut()
                    .ok_or_else(|| usage(format!("`{key}`: index [{idx}] applied to a value that is not a list")))?;
                let len = arr.len();
                let slot = arr.get_mut(*idx).ok_or_else(|| {
                    usage(format!(
                        "`{key}`: index [{idx}] is out of range (the list has {len} entries)"
                    ))
                })?;
                if last {
                    *slot = value;
                    return Ok(());
                }
                slot
            }
        };
    }
    Ok(())
}

/// Loads the config from `file` (or the quickstart), the environment and `sets`.
pub fn load(file: Option<&Path>, sets: &[String]) -> Result<(RunConfig, ConfigOrigin)> {
    let mut fig = Figment::new();
    let mut toml_text = None;
    match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::input_failed(format!("config file {}", path.display()), "cannot read", e))?;
            let ext = path
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("")
                .to_ascii_lowercase();
            fig = match ext.as_str() {
                "toml" => {
                    toml_text = Some(text.clone());
                    fig.merge(Toml::string(&text))
                }
                "yaml" | "yml" => fig.merge(Yaml::string(&text)),
                "json" => fig.merge(Json::string(&text)),
                _ => {
                    return Err(Error::input(
                        format!("config file {}", path.display()),
                        "unknown format: expected a .toml, .yaml, .yml or .json file",
                    ))
                }
            };
        }
        None => {
            toml_text = Some(QUICKSTART_TOML.to_string());
            fig = fig.merge(Toml::string(QUICKSTART_TOML));
        }
    }
    let env = Env::prefixed("RETORT_").split("__").ignore(NON_CONFIG_ENV);
    let env_keys: Vec<String> = env.iter().map(|(k, _)| k.as_str().to_string()).collect();
    fig = fig.merge(env);
    let origin = ConfigOrigin {
        file: file.map(Path::to_path_buf),
        toml_text,
        sets: sets.to_vec(),
        env_keys,
    };
    let where_ = || match file {
        Some(f) => format!("config file {}", f.display()),
        None => "built-in quickstart config".to_string(),
    };
    let mut value: Value = fig
        .extract()
        .map_err(|e| Error::input(where_(), e.to_string().replace("\n", " ")))?;
    if value.is_null() {
        value = Value::Object(Map::new());
    }
    if !value.is_object() {
        return Err(Error::input(where_(), "the top level must be a table of sections"));
    }
    for s in sets {
        apply_set(&mut value, s)?;
    }
    let cfg = serde_path_to_error::deserialize::<_, RunConfig>(value).map_err(|e| {
        let path = e.path().to_string();
        origin.annotate(Error::config(path, e.into_inner().to_string()))
    })?;
    Ok((cfg, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn an_unknown_section_made_by_a_set_points_at_the_set() {
        let err = load(None, &["trian.steps=3".into()])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("`trian`") && err.contains("--set trian.steps=3"), "{err}");
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
}
