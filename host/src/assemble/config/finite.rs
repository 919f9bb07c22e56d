//! Every number of a config is finite. `nan` and `inf` (TOML, YAML, `--set`, a `RETORT_*`
//! variable) are refused wherever they appear (sections, plugin params, schedule params,
//! number-or-schedule values) with their key path, before anything reads the config: a JSON
//! value has no NaN, so one that slipped through would read as an absent key.

use figment::value::{Num, Value};

use retort_core::{Error, Result};

/// A config error at the first non-finite number of `root`.
pub(super) fn check(root: &Value) -> Result<()> {
    match first_non_finite(root, "") {
        Some((path, v)) => Err(Error::config(path, format!("expected a finite number, got {v}"))),
        None => Ok(()),
    }
}

/// The key path (`loss[0].weight.start`) and value of the first non-finite number in `v`,
/// whose own path is `path`.
fn first_non_finite(v: &Value, path: &str) -> Option<(String, f64)> {
    match v {
        Value::Num(_, n) => float(n).filter(|x| !x.is_finite()).map(|x| (path.to_string(), x)),
        Value::Dict(_, d) => d.iter().find_map(|(k, v)| {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            first_non_finite(v, &p)
        }),
        Value::Array(_, a) => a
            .iter()
            .enumerate()
            .find_map(|(i, v)| first_non_finite(v, &format!("{path}[{i}]"))),
        _ => None,
    }
}

fn float(n: &Num) -> Option<f64> {
    match n {
        Num::F32(x) => Some(f64::from(*x)),
        Num::F64(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(toml_text: &str) -> Value {
        Value::serialize(toml::from_str::<toml::Table>(toml_text).expect("toml")).expect("value")
    }

    #[test]
    fn finds_the_path_of_nan_and_inf_at_any_depth() {
        let t = tree("[train]\nema_decay = nan\n");
        let err = check(&t).expect_err("nan").to_string();
        assert!(
            err.contains("`train.ema_decay`") && err.contains("finite") && err.contains("NaN"),
            "{err}"
        );
        let t = tree("[[loss]]\nkind = \"kl\"\n[[loss]]\nkind = \"ce\"\nweight = { kind = \"linear\", start = -inf, end = 1.0 }\n");
        let err = check(&t).expect_err("inf").to_string();
        assert!(err.contains("`loss[1].weight.start`") && err.contains("-inf"), "{err}");
        let t = tree("[router]\nkind = \"x\"\nphases = [{ until = inf }]\n");
        assert!(check(&t)
            .expect_err("inf")
            .to_string()
            .contains("router.phases[0].until"));
    }

    #[test]
    fn finite_numbers_and_other_values_pass() {
        let t = tree("[train]\nlr = 1e-3\nsteps = 3\n[run]\nname = \"nan\"\n");
        assert!(check(&t).is_ok());
    }
}
