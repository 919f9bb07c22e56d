//! Overrides of single keys on top of the config file: `RETORT_*` environment variables
//! (`RETORT_TRAIN__STEPS=100`, `RETORT_LOSS__0__TEMPERATURE=3`) and `--set key.path=value`
//! (`--set loss[1].temperature=3`), applied in that order to the file's value tree.
//!
//! A list element is reached by its index (`loss[0]`, or `LOSS__0` in a variable name); an
//! override changes existing list elements and creates missing table keys.

use figment::value::{Dict, Value};

use retort_core::{Error, Result};

/// Environment variables with the `RETORT_` prefix that are not config keys: retort's own
/// (`RETORT_LOG`, `RETORT_PLUGIN_PATH`, `RETORT_AMX`, `RETORT_TENSOR_CORES`) and those the
/// scripts in `scripts/` read, which a user may have exported.
const NON_CONFIG_ENV: &[&str] = &[
    "amx",
    "tensor_cores",
    "log",
    "plugin_path",
    "cuda_prefix",
    "smollm2_gguf",
    "text",
    "kd_step",
    "kd_step_before",
];

/// One step of a key path.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Segment {
    /// A table key (or, on a list, a decimal index).
    Key(String),
    /// A list index (`[2]`).
    Index(usize),
}

/// Splits `a.b[2].c` into segments; `None` for a malformed path.
pub(super) fn path_segments(path: &str) -> Option<Vec<Segment>> {
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

/// A `RETORT_*` variable that sets a config key.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvOverride {
    /// The variable's name, e.g. `RETORT_LOSS__0__TEMPERATURE`.
    pub var: String,
    /// The key path it sets, lowercase with dots: `loss.0.temperature`.
    pub key: String,
    /// Its value as written.
    pub value: String,
}

impl EnvOverride {
    /// The override of `var=value`; `None` when `var` is not a config key.
    pub fn new(var: &str, value: &str) -> Option<Self> {
        let prefix = var.get(..7).filter(|p| p.eq_ignore_ascii_case("RETORT_"))?;
        let key = var[prefix.len()..].to_ascii_lowercase().replace("__", ".");
        if key.is_empty() || key.split('.').any(str::is_empty) || NON_CONFIG_ENV.contains(&key.as_str()) {
            return None;
        }
        Some(EnvOverride {
            var: var.to_string(),
            key,
            value: value.to_string(),
        })
    }

    /// Every `RETORT_*` config variable of the process environment, sorted by name.
    pub fn from_process() -> Vec<Self> {
        let mut all: Vec<Self> = std::env::vars_os()
            .filter_map(|(k, v)| Self::new(k.to_str()?, v.to_str()?))
            .collect();
        all.sort_by(|a, b| a.var.cmp(&b.var));
        all
    }

    /// Applies it to `root`. Values parse as in figment (`3`, `2.5`, `true`, `[1, 2]`,
    /// `{a = 1}`, `"quoted"`, anything else a string).
    pub(super) fn apply(&self, root: &mut Value) -> Result<()> {
        let segments: Vec<Segment> = self.key.split('.').map(|s| Segment::Key(s.to_string())).collect();
        let value = match self.value.parse::<Value>() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        set(root, &segments, value).map_err(|m| {
            Error::config(
                format!("environment variable {}", self.var),
                format!("`{}`: {m}", self.key),
            )
        })
    }
}

/// Applies one `--set key.path=value` to `root`.
pub(super) fn apply_set(root: &mut Value, set_arg: &str) -> Result<()> {
    let usage = |m: String| Error::config("--set", m);
    let (key, raw) = set_arg
        .split_once('=')
        .ok_or_else(|| usage(format!("expected KEY=VALUE, got `{set_arg}`")))?;
    let segments = path_segments(key.trim()).ok_or_else(|| usage(format!("malformed key path `{key}`")))?;
    set(root, &segments, parse_set_value(raw.trim())).map_err(|m| usage(format!("`{}`: {m}", shortened(key))))
}

/// `key` as an error shows it: at most 60 characters.
fn shortened(key: &str) -> String {
    match key.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &key[..i]),
        None => key.to_string(),
    }
}

/// Parses the value of a `--set`: a TOML value (`3`, `2.5`, `nan`, `true`, `"x"`, `[1, 2]`),
/// else (dates included) a bare string.
fn parse_set_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    let parsed = toml::from_str::<toml::Table>(&doc)
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !matches!(v, toml::Value::Datetime(_)));
    parsed
        .and_then(|v| Value::serialize(v).ok())
        .unwrap_or_else(|| Value::from(raw.to_string()))
}

/// Most parts of an override's key path (a deeper one would nest values past what the stack holds).
const MAX_KEY_DEPTH: usize = 32;

/// Puts `value` at `segments` under `root`; a message saying what is wrong otherwise.
fn set(root: &mut Value, segments: &[Segment], value: Value) -> std::result::Result<(), String> {
    if segments.len() > MAX_KEY_DEPTH {
        return Err(format!(
            "a key path of {} parts (at most {MAX_KEY_DEPTH})",
            segments.len()
        ));
    }
    set_within(root, segments, value)
}

fn set_within(root: &mut Value, segments: &[Segment], value: Value) -> std::result::Result<(), String> {
    let Some((first, rest)) = segments.split_first() else {
        *root = value;
        return Ok(());
    };
    match (first, root) {
        (Segment::Key(k), Value::Dict(_, dict)) => {
            if rest.is_empty() {
                dict.insert(k.clone(), value);
                return Ok(());
            }
            if let (None, Some(Segment::Index(i))) = (dict.get(k), rest.first()) {
                return Err(format!(
                    "`{k}` is not in the config, so it has no element [{i}] to set (a built-in default applies \
                     only where the key is absent): write `{k}` in the config file, or set it whole"
                ));
            }
            let child = dict.entry(k.clone()).or_insert_with(|| Dict::new().into());
            set_within(child, rest, value)
        }
        (Segment::Index(i), Value::Array(_, list)) => set_element(list, *i, rest, value),
        (Segment::Key(k), Value::Array(_, list)) => match k.parse::<usize>() {
            Ok(i) => set_element(list, i, rest, value),
            Err(_) => Err(format!("`{k}` is a key, and the value it is applied to is a list")),
        },
        (Segment::Key(k), _) => Err(format!("`{k}` is inside a value that is not a table")),
        (Segment::Index(i), _) => Err(format!("index [{i}] applied to a value that is not a list")),
    }
}

fn set_element(list: &mut [Value], i: usize, rest: &[Segment], value: Value) -> std::result::Result<(), String> {
    let len = list.len();
    let slot = list
        .get_mut(i)
        .ok_or_else(|| format!("index [{i}] is out of range (the list has {len} entries)"))?;
    set_within(slot, rest, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(toml_text: &str) -> Value {
        Value::serialize(toml::from_str::<toml::Table>(toml_text).expect("toml")).expect("value")
    }

    fn json(v: &Value) -> serde_json::Value {
        serde_json::to_value(v).expect("json")
    }

    const BASE: &str = "[train]\nsteps = 3\n[[loss]]\nkind = \"kl\"\n[[loss]]\nkind = \"ce\"\n";

    #[test]
    fn env_overrides_set_list_elements_and_new_keys() {
        let mut t = tree(BASE);
        for (var, value) in [
            ("RETORT_LOSS__1__TEMPERATURE", "3"),
            ("RETORT_TRAIN__EMA_DECAY", "0.5"),
            ("RETORT_RUN__NAME", "x y"),
        ] {
            EnvOverride::new(var, value)
                .expect("config var")
                .apply(&mut t)
                .expect("apply");
        }
        let j = json(&t);
        assert_eq!(j["loss"][1]["temperature"], 3);
        assert_eq!(j["loss"][0], serde_json::json!({"kind": "kl"}));
        assert_eq!(j["train"]["ema_decay"], 0.5);
        assert_eq!(j["run"]["name"], "x y");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let mut t = tree(BASE);
        let err = EnvOverride::new("RETORT_LOSS__5__WEIGHT", "1")
            .expect("config var")
            .apply(&mut t)
            .expect_err("out of range")
            .to_string();
        assert!(
            err.contains("RETORT_LOSS__5__WEIGHT") && err.contains("out of range"),
            "{err}"
        );
        let err = EnvOverride::new("RETORT_TRAIN__STEPS__X", "1")
            .expect("config var")
            .apply(&mut t)
            .expect_err("not a table")
            .to_string();
        assert!(
            err.contains("RETORT_TRAIN__STEPS__X") && err.contains("not a table"),
            "{err}"
        );
    }

    #[test]
    fn non_config_variables_are_not_overrides() {
        for var in [
            "RETORT_CUDA_PREFIX",
            "RETORT_TEXT",
            "RETORT_SMOLLM2_GGUF",
            "RETORT_KD_STEP",
        ] {
            assert_eq!(EnvOverride::new(var, "/some/path"), None, "{var} is read by a script");
        }
        assert_eq!(EnvOverride::new("RETORT_LOG", "debug"), None);
        assert_eq!(EnvOverride::new("RETORT_AMX", "0"), None);
        assert_eq!(EnvOverride::new("RETORT_TENSOR_CORES", "0"), None);
        assert_eq!(EnvOverride::new("RETORT_PLUGIN_PATH", "x"), None);
        assert_eq!(EnvOverride::new("RETORT_A____B", "x"), None);
        assert_eq!(EnvOverride::new("HOME", "x"), None);
        assert_eq!(
            EnvOverride::new("RETORT_TRAIN__STEPS", "1").expect("var").key,
            "train.steps"
        );
    }

    #[test]
    fn sets_parse_toml_values_and_keep_dates_as_strings() {
        let mut t = tree(BASE);
        apply_set(&mut t, "loss[0].temperature=2.5").expect("set");
        apply_set(&mut t, "run.name=2024-01-01").expect("set");
        apply_set(&mut t, "train.lr={ kind = \"linear\", start = 1.0, end = 0.5 }").expect("set");
        let j = json(&t);
        assert_eq!(j["loss"][0]["temperature"], 2.5);
        assert_eq!(j["run"]["name"], "2024-01-01");
        assert_eq!(j["train"]["lr"]["kind"], "linear");
        let err = apply_set(&mut t, "loss[9].weight=1").expect_err("range").to_string();
        assert!(err.contains("out of range") && err.contains("--set"), "{err}");
    }

    #[test]
    fn an_element_of_an_absent_list_is_explained() {
        let mut t = tree("[train]\nsteps = 3\n");
        let err = apply_set(&mut t, "loss[0].temperature=3")
            .expect_err("no list")
            .to_string();
        assert!(
            err.contains("`loss` is not in the config") && err.contains("set it whole"),
            "{err}"
        );
    }

    #[test]
    fn a_key_path_deeper_than_the_limit_is_refused_not_a_stack_overflow() {
        let mut t = tree("");
        let deep = vec!["a"; 100_000].join(".");
        let err = apply_set(&mut t, &format!("{deep}=1"))
            .expect_err("too deep")
            .to_string();
        assert!(err.contains("100000 parts") && err.contains("--set"), "{err}");
        assert!(err.len() < 300, "the key is shortened: {err}");
        apply_set(&mut t, &format!("{}=1", vec!["b"; 32].join("."))).expect("32 parts are fine");
    }
}
