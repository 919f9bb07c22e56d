//! Parameter groups (`train.param_groups`, a stage's `param_groups`): each parameter belongs to
//! the first group whose regex matches its whole name, with that group's learning-rate factor
//! (0 freezes) and weight decay; the rest fall in the `default` group (factor 1, matrices that
//! are not embeddings decay).

use candle_core::Var;
use regex::Regex;

use retort_core::config::ParamGroupSpec;
use retort_core::{Error, Result};

use crate::artifacts::events::GroupSummary;

/// Whether the default rule decays a parameter: matrices that are not embeddings (so not
/// biases, norms or embeddings).
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !(name.contains("wte") || name.contains("wpe") || name.contains("embed"))
}

/// One parameter with its group settings.
pub struct GroupedParam {
    /// Checkpoint name.
    pub name: String,
    /// The parameter.
    pub var: Var,
    /// Index into the group summaries.
    pub group: usize,
    /// Learning-rate factor (0 = frozen).
    pub lr_mult: f64,
    /// Effective weight decay.
    pub weight_decay: f64,
}

/// Assigns every parameter to the first group whose pattern matches its whole name.
/// An invalid regex, or a pattern that matches nothing, is a config error naming the pattern.
pub fn assign_groups(
    vars: Vec<(String, Var)>,
    specs: &[ParamGroupSpec],
    default_wd: f64,
    key: &str,
) -> Result<(Vec<GroupedParam>, Vec<GroupSummary>)> {
    let mut regexes = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let path = format!("{key}[{i}].pattern");
        let re = Regex::new(&format!("^(?:{})$", s.pattern))
            .map_err(|e| Error::config(path.clone(), format!("invalid regex `{}`: {e}", s.pattern)))?;
        if !(s.lr_mult.is_finite() && s.lr_mult >= 0.0) {
            return Err(Error::config(
                format!("{key}[{i}].lr_mult"),
                format!("expected a number >= 0, got {}", s.lr_mult),
            ));
        }
        if let Some(wd) = s.weight_decay.filter(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(Error::config(
                format!("{key}[{i}].weight_decay"),
                format!("expected a number >= 0, got {wd}"),
            ));
        }
        regexes.push(re);
    }
    let mut summaries: Vec<GroupSummary> = specs
        .iter()
        .map(|s| GroupSummary {
            pattern: s.pattern.clone(),
            tensors: 0,
            parameters: 0,
            lr_mult: s.lr_mult,
            weight_decay: s
                .weight_decay
                .map(|w| w.to_string())
                .unwrap_or_else(|| "default rule".into()),
        })
        .collect();
    summaries.push(GroupSummary {
        pattern: "default".into(),
        tensors: 0,
        parameters: 0,
        lr_mult: 1.0,
        weight_decay: "default rule".into(),
    });
    let example = vars.first().map(|(n, _)| n.clone()).unwrap_or_default();
    let mut out = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let group = regexes.iter().position(|r| r.is_match(&name)).unwrap_or(specs.len());
        let (lr_mult, wd) = match specs.get(group) {
            Some(s) => (s.lr_mult, s.weight_decay),
            None => (1.0, None),
        };
        let weight_decay = wd.unwrap_or(if decays(&name, var.rank()) { default_wd } else { 0.0 });
        summaries[group].tensors += 1;
        summaries[group].parameters += var.elem_count();
        out.push(GroupedParam {
            name,
            var,
            group,
            lr_mult,
            weight_decay,
        });
    }
    for (i, s) in summaries.iter().enumerate().take(specs.len()) {
        if s.tensors == 0 {
            return Err(Error::config(
                format!("{key}[{i}].pattern"),
                format!(
                    "`{}` matches no parameter (it must match whole names such as `{example}`)",
                    s.pattern
                ),
            ));
        }
    }
    Ok((out, summaries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bad_patterns_are_config_errors() {
        let v = Var::new(&[1.0f64], &Device::Cpu).expect("v");
        let bad = vec![ParamGroupSpec {
            pattern: "(".into(),
            lr_mult: 1.0,
            weight_decay: None,
        }];
        let err = assign_groups(vec![("a".into(), v.clone())], &bad, 0.0, "train.param_groups")
            .err()
            .expect("invalid regex");
        assert!(err.to_string().contains("train.param_groups[0].pattern") && err.to_string().contains("invalid regex"));
        let none = vec![ParamGroupSpec {
            pattern: "zzz".into(),
            lr_mult: 1.0,
            weight_decay: None,
        }];
        let err = assign_groups(vec![("a".into(), v)], &none, 0.0, "train.param_groups")
            .err()
            .expect("no match");
        assert!(err.to_string().contains("matches no parameter"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }
}
