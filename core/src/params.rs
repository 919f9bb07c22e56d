//! Component parameters: the keys of a `{ kind = "...", ... }` table other than `kind`.
//!
//! Each plugin parses its parameters into its own `#[serde(deny_unknown_fields)]` struct with
//! [`Params::parse`]; errors name the full key path (`loss[1].temperature`).

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The parameters of one component, with the key path they live at.
#[derive(Debug, Clone)]
pub struct Params {
    path: String,
    values: Map<String, Value>,
}

impl Params {
    /// Parameters `values` found at key path `path`.
    pub fn new(path: impl Into<String>, values: Map<String, Value>) -> Self {
        Params {
            path: path.into(),
            values,
        }
    }

    /// Empty parameters at `path`.
    pub fn empty(path: impl Into<String>) -> Self {
        Params::new(path, Map::new())
    }

    /// Key path of the component, e.g. `loss[1]`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Raw values.
    pub fn values(&self) -> &Map<String, Value> {
        &self.values
    }

    /// The key path of `key` inside this component.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    /// Deserializes into `T`; a wrong type or unknown key is a config error naming the path.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        let value = Value::Object(self.values.clone());
        serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
            let inner = e.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                self.path.clone()
            } else {
                self.key_path(&inner)
            };
            Error::config(path, e.into_inner().to_string())
        })
    }

    /// A config error for `key` of this component.
    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        Error::config(self.key_path(key), message)
    }

    /// Checks `value > 0` and finite, else a config error for `key`.
    pub fn require_positive(&self, key: &str, value: f64) -> Result<()> {
        if value.is_finite() && value > 0.0 {
            Ok(())
        } else {
            Err(self.error(key, format!("expected a finite number > 0, got {value}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct P {
        #[allow(dead_code)]
        temperature: f64,
    }

    fn params(json: &str) -> Params {
        let Value::Object(m) = serde_json::from_str(json).expect("test json") else {
            panic!("not an object")
        };
        Params::new("loss[1]", m)
    }

    #[test]
    fn wrong_type_names_full_key_path() {
        let err = params(r#"{"temperature": "hot"}"#).parse::<P>().expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("loss[1].temperature"), "{msg}");
        assert!(msg.contains("expected f64"), "{msg}");
    }

    #[test]
    fn unknown_key_lists_accepted_keys() {
        let err = params(r#"{"temprature": 2.0}"#).parse::<P>().expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("temprature") && msg.contains("temperature"), "{msg}");
        assert!(msg.starts_with("config error at `loss[1]"), "{msg}");
    }

    #[test]
    fn positive_check() {
        let p = params("{}");
        assert!(p.require_positive("temperature", 2.0).is_ok());
        let msg = p
            .require_positive("temperature", -1.0)
            .expect_err("must fail")
            .to_string();
        assert!(msg.contains("loss[1].temperature") && msg.contains("> 0"), "{msg}");
    }
}
