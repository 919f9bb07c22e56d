//! A section or table given as a list is refused. serde reads a struct from a sequence
//! positionally, so `--set train=[1, 2]` would otherwise set `train.steps = 1` and
//! `train.batch_size = 2` without a word.

use serde_json::Value;

use retort_core::{Error, Result};

/// A config error at the first key of `given` (the config as written) holding a list where
/// `read` (the config as deserialized, then serialized back) holds a table.
pub(super) fn check(given: &Value, read: &Value) -> Result<()> {
    match first_list_for_table(given, read, "") {
        Some(path) => Err(Error::config(path, "expected a table of keys, got a list")),
        None => Ok(()),
    }
}

fn first_list_for_table(given: &Value, read: &Value, path: &str) -> Option<String> {
    match (given, read) {
        (Value::Array(_), Value::Object(_)) => Some(path.to_string()),
        (Value::Object(g), Value::Object(r)) => g.iter().find_map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            first_list_for_table(v, r.get(k)?, &p)
        }),
        (Value::Array(g), Value::Array(r)) => {
            (g.iter().zip(r).enumerate()).find_map(|(i, (g, r))| first_list_for_table(g, r, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_list_where_a_table_was_read_is_named() {
        let read = json!({"train": {"steps": 1, "batch_size": 2}, "loss": [{"kind": "kl", "w": {"a": 1}}]});
        assert!(check(&json!({"train": {"steps": 1}, "loss": [{"kind": "kl"}]}), &read).is_ok());
        let err = check(&json!({"train": [1, 2]}), &read).expect_err("list for table");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("`train`"), "{err}");
        let err = check(&json!({"loss": [{"w": []}]}), &read).expect_err("nested");
        assert!(err.to_string().contains("loss[0].w"), "{err}");
        assert!(check(&json!({"layers": [0, 1]}), &json!({"layers": [0, 1]})).is_ok());
    }
}
