//! Where a config value came from: a `--set`, a `RETORT_*` variable, or a line of the file.

use std::path::PathBuf;

use retort_core::Error;

use super::overrides::{path_segments, EnvOverride, Segment};

/// Where the config came from, for locating errors.
#[derive(Debug, Clone)]
pub struct ConfigOrigin {
    /// The file, or `None` for the built-in quickstart.
    pub file: Option<PathBuf>,
    /// Its text (TOML files only; used for line numbers).
    pub(super) toml_text: Option<String>,
    /// `--set` overrides as given.
    pub sets: Vec<String>,
    /// Config keys set from the environment.
    pub env: Vec<EnvOverride>,
}

/// `a[1].b` as `a.1.b`, indices without leading zeros (`--set loss[00].weight` sets `loss[0]`).
fn dotted(path: &str) -> String {
    let flat = path.replace('[', ".").replace(']', "");
    let canonical = |seg: &str| match seg.parse::<u64>() {
        Ok(i) if seg.bytes().all(|b| b.is_ascii_digit()) => i.to_string(),
        _ => seg.to_string(),
    };
    flat.split('.').map(canonical).collect::<Vec<_>>().join(".")
}

impl ConfigOrigin {
    /// The config file's path, or `built-in quickstart config`.
    pub fn label(&self) -> String {
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "built-in quickstart config".to_string(),
        }
    }

    /// A human location of key path `path`: `set by --set ...`, `set by environment variable
    /// RETORT_...`, or `file:line`. An override that set the key (or a table holding it) comes
    /// first, then the file's line of the key (with an override of a key inside it, if any); an
    /// override that set a key inside it (an unknown section `--set bogus.x=1`) before the line
    /// of the nearest key the file has.
    pub fn locate(&self, path: &str) -> String {
        let key = dotted(path);
        let sets = || {
            self.sets
                .iter()
                .rev()
                .filter_map(|s| Some((s, dotted(s.split_once('=')?.0.trim()))))
        };
        let holds = |k: &str| key == k || key.starts_with(&format!("{k}."));
        let inside = |k: &str| k.starts_with(&format!("{key}."));
        let set_by = |matches: &dyn Fn(&str) -> bool| {
            if let Some((s, _)) = sets().find(|(_, k)| matches(k)) {
                return Some(format!("set by --set {s}"));
            }
            let env = self.env.iter().rev().find(|e| matches(&e.key))?;
            Some(format!("set by environment variable {}", env.var))
        };
        if let Some(found) = set_by(&holds) {
            return found;
        }
        let line = self.toml_text.as_deref().and_then(|t| toml_line(t, path));
        if let Some((line, true)) = line {
            let here = format!("{}:{line}", self.label());
            // An error about a whole table (`student`) whose keys were overridden names both.
            return match set_by(&inside) {
                Some(found) => format!("{here}; inside it, {found}"),
                None => here,
            };
        }
        if let Some(found) = set_by(&inside) {
            return found;
        }
        match line {
            Some((line, _)) => format!("{}:{line}", self.label()),
            None => self.label(),
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

/// 1-based line of the deepest prefix of `path` in TOML `text`, and whether that is all of
/// `path`.
fn toml_line(text: &str, path: &str) -> Option<(usize, bool)> {
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
    let mut found = 0;
    for seg in &segs {
        let table = match (seg, &node) {
            (Segment::Key(_), Node::Table(t)) => Some(*t as &dyn toml_edit::TableLike),
            (Segment::Key(_), Node::Item(item)) => item.as_table_like(),
            (Segment::Key(_), Node::Value(TV::InlineTable(t))) => Some(t as &dyn toml_edit::TableLike),
            _ => None,
        };
        let next = match (seg, table, &node) {
            (Segment::Key(k), Some(t), _) => t.get_key_value(k).map(|(key, item)| {
                span = key.span().or(item.span()).or(span.clone());
                Node::Item(item)
            }),
            (Segment::Index(i), _, Node::Item(Item::ArrayOfTables(a))) => a.get(*i).map(|t| {
                span = t.span().or(span.clone());
                Node::Table(t)
            }),
            (Segment::Index(i), _, Node::Item(Item::Value(TV::Array(a))) | Node::Value(TV::Array(a))) => {
                a.get(*i).map(|v| {
                    span = v.span().or(span.clone());
                    Node::Value(v)
                })
            }
            _ => None,
        };
        match next {
            Some(n) => {
                node = n;
                found += 1;
            }
            None => break,
        }
    }
    let start = span?.start;
    Some((
        text[..start.min(text.len())].matches('\n').count() + 1,
        found == segs.len(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[train]\nbatch_size = 2\n\n[eval]\nbatches = 1\nbatch_size = 0\n\n[[loss]]\nkind = \"kl\"\nweight = { kind = \"linear\", start = 1.0, end = 0.0 }\n";

    fn origin(sets: &[&str], env: &[(&str, &str)]) -> ConfigOrigin {
        ConfigOrigin {
            file: Some("c.toml".into()),
            toml_text: Some(TEXT.into()),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            env: env.iter().filter_map(|(k, v)| EnvOverride::new(k, v)).collect(),
        }
    }

    #[test]
    fn file_keys_get_their_own_line() {
        let o = origin(&[], &[]);
        assert_eq!(o.locate("eval.batch_size"), "c.toml:6");
        assert_eq!(o.locate("train.batch_size"), "c.toml:2");
        assert_eq!(o.locate("loss[0].weight.start"), "c.toml:10");
        // A key the file lacks: the nearest key it has.
        assert_eq!(o.locate("eval.baseline"), "c.toml:4");
    }

    #[test]
    fn overrides_win_for_their_keys_and_for_keys_the_file_lacks() {
        let o = origin(
            &["bogus.x=1", "loss[0].temperature=3"],
            &[("RETORT_EVAL__BATCHES", "2"), ("RETORT_TRAIN__LM_HEAD__FUSED", "x")],
        );
        assert_eq!(o.locate("bogus"), "set by --set bogus.x=1");
        assert_eq!(o.locate("loss[0].temperature"), "set by --set loss[0].temperature=3");
        // An index written with leading zeros is the same element (found by proptest).
        let zeros = origin(&["loss[00]="], &[]);
        assert_eq!(zeros.locate("loss[0]"), "set by --set loss[00]=");
        assert_eq!(
            o.locate("eval.batches"),
            "set by environment variable RETORT_EVAL__BATCHES"
        );
        assert_eq!(
            o.locate("train.lm_head"),
            "set by environment variable RETORT_TRAIN__LM_HEAD__FUSED"
        );
        // The file has `loss[0]`: its line, and the set inside it that may be the cause.
        assert_eq!(
            o.locate("loss[0]"),
            "c.toml:8; inside it, set by --set loss[0].temperature=3"
        );
    }
}
