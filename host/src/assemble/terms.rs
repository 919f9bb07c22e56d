//! The objective's terms (`[[loss]]`), built and checked against the models they read.

use retort_core::config::RunConfig;
use retort_core::{BuildContext, Error, LossTerm, Params, Result, Scalar, Student, Teacher};

/// A loss term with its metrics name and configured weight.
pub struct TermSlot {
    /// Name in metrics (`kind`, `kind_i` when a kind repeats, or the configured `name`).
    pub name: String,
    /// Configured weight (a number or a schedule).
    pub weight: Scalar,
    /// The term.
    pub term: Box<dyn LossTerm>,
}

impl TermSlot {
    /// The objective of teacher pretraining and of the scratch baseline: `ce` with weight 1.
    pub fn hard_labels(ctx: &BuildContext) -> Result<Vec<TermSlot>> {
        let term = ctx
            .registry
            .losses
            .build("ce", &Params::empty("baseline.loss[0]"), ctx)?;
        Ok(vec![TermSlot {
            name: "ce".into(),
            weight: Scalar::Const(1.0),
            term,
        }])
    }
}

/// Every `[[loss]]` built; each term's student taps must exist, and a term needing dense
/// teacher logits is refused with a teacher that has only its top-k.
pub(super) fn build(config: &RunConfig, ctx: &BuildContext, student: &dyn Student) -> Result<Vec<TermSlot>> {
    if config.loss.is_empty() {
        return Err(Error::config("loss", "at least one loss term is required"));
    }
    let available = student.available_taps();
    let mut terms = Vec::with_capacity(config.loss.len());
    for (i, spec) in config.loss.iter().enumerate() {
        let path = format!("loss[{i}]");
        let weight_path = format!("{path}.weight");
        let weight = spec.weight.build(&weight_path, ctx)?;
        let term = ctx.registry.losses.build(&spec.kind, &spec.params_at(&path), ctx)?;
        check_weight(&weight, &weight_path, term.signed_weights())?;
        if let Some(tap) = term.student_taps().into_iter().find(|t| !available.contains(t)) {
            return Err(Error::config(
                path,
                format!("asks for student tap `{tap}`, which the student does not have"),
            ));
        }
        if let (Some(k), true) = (ctx.teacher_topk, term.needs_teacher_logits()) {
            return Err(Error::config(
                path,
                format!(
                    "`{}` needs the teacher's dense logits, and the teacher ({}) has only its top-{k} log-probs; use \
                     `kl` or `topk_kl`, or a live teacher",
                    spec.kind, config.teacher.kind
                ),
            ));
        }
        if let Some(name) = &spec.name {
            super::checks::identifier(&format!("{path}.name"), name)?;
        }
        let repeated = config.loss.iter().filter(|s| s.kind == spec.kind).count() > 1;
        let name = spec.name.clone().unwrap_or_else(|| match repeated {
            true => format!("{}_{i}", spec.kind),
            false => spec.kind.clone(),
        });
        terms.push(TermSlot { name, weight, term });
    }
    let names: Vec<&str> = terms.iter().map(|t| t.name.as_str()).collect();
    check_unique_names(config, &names)?;
    Ok(terms)
}

/// A term's weight (number or schedule) is finite over all of training, and >= 0 unless the
/// term declares signed weights.
pub(super) fn check_weight(weight: &Scalar, path: &str, signed: bool) -> Result<()> {
    if signed {
        weight.check(path, f64::is_finite, "a finite number")
    } else {
        weight.check(
            path,
            |v| v.is_finite() && v >= 0.0,
            "a finite number >= 0 (the term does not declare signed weights)",
        )
    }
}

/// No two terms share a name: their metrics, stage weights and parameters would mix.
fn check_unique_names(config: &RunConfig, names: &[&str]) -> Result<()> {
    for (j, name) in names.iter().enumerate() {
        let Some(i) = names[..j].iter().position(|n| n == name) else {
            continue;
        };
        let key = match config.loss[j].name {
            Some(_) => format!("loss[{j}].name"),
            None => format!("loss[{j}]"),
        };
        return Err(Error::config(
            key,
            format!(
                "loss[{i}] and loss[{j}] are both named `{name}` (their metrics and stage weights would mix); give \
                 one of them a name of its own, e.g. `name = \"{name}_{j}\"`"
            ),
        ));
    }
    Ok(())
}

/// Every teacher tap a term asks for exists on `teacher`.
pub(super) fn check_teacher_taps(terms: &[TermSlot], teacher: &dyn Teacher) -> Result<()> {
    for (i, slot) in terms.iter().enumerate() {
        if let Some(tap) = slot.term.teacher_taps().into_iter().find(|t| !teacher.supports_tap(t)) {
            return Err(Error::config(
                format!("loss[{i}]"),
                format!("asks for teacher tap `{tap}`, which the teacher does not have"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_core::config::LossSpec;

    #[test]
    fn weights_below_zero_need_a_signed_term() {
        let w = Scalar::Const(-0.5);
        let err = check_weight(&w, "loss[0].weight", false)
            .expect_err("negative")
            .to_string();
        assert!(
            err.contains("loss[0].weight") && err.contains(">= 0") && err.contains("-0.5"),
            "{err}"
        );
        assert!(check_weight(&w, "loss[0].weight", true).is_ok());
        assert!(check_weight(&Scalar::Const(f64::INFINITY), "loss[0].weight", true).is_err());
        assert!(check_weight(&Scalar::Const(0.0), "loss[0].weight", false).is_ok());
    }

    #[test]
    fn repeated_names_name_both_terms() {
        let mut config = RunConfig::default();
        config.loss.push(LossSpec {
            kind: "ce".into(),
            weight: 1.0.into(),
            name: Some("kl".into()),
            params: Default::default(),
        });
        let err = check_unique_names(&config, &["kl", "ce", "kl"])
            .expect_err("clash")
            .to_string();
        assert!(
            err.contains("loss[2].name") && err.contains("loss[0] and loss[2]") && err.contains("name = \"kl_2\""),
            "{err}"
        );
        assert!(check_unique_names(&config, &["kl", "ce", "kl_2"]).is_ok());
    }
}
