//! Router `curriculum`: switches terms on progressively over training, with smooth ramps.
//!
//! `phases` lists, in order, the end of each phase (`until`, a fraction of the run) and the
//! terms active in it (term names, or `"all"`). A term first becomes active at the start `s`
//! of the first phase that lists it; from then its gate rises linearly from 0 to 1 over `ramp`
//! (a fraction of the run): `gate = clamp((p - s) / ramp, 0, 1)` (a term active from the
//! start has gate 1). A term that a later phase leaves out is switched off at that phase. The
//! weight is `configured weight * gate`; gates are logged as `router.gate.<term>`.
//!
//! ```toml
//! [router]
//! kind = "curriculum"
//! ramp = 0.05
//! phases = [
//!   { until = 0.3, terms = ["kl"] },
//!   { until = 0.6, terms = ["kl", "hidden_mse", "attention"] },
//!   { until = 1.0, terms = "all" },
//! ]
//! ```

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;

use retort_core::de::expected_got;
use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, Params, Result, Router, TermSignals};

/// Terms of a phase.
#[derive(Debug, Clone, schemars::JsonSchema)]
#[serde(untagged)]
pub enum PhaseTerms {
    /// `"all"`.
    All(String),
    /// Named terms.
    Names(Vec<String>),
}

/// What a phase's `terms` accepts, for messages.
const TERMS_EXPECTED: &str = "\"all\" or a list of term names";

/// `"all"` or a list of names; anything else is refused saying so.
impl<'de> Deserialize<'de> for PhaseTerms {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(TermsVisitor)
    }
}

struct TermsVisitor;

impl<'de> Visitor<'de> for TermsVisitor {
    type Value = PhaseTerms;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(TERMS_EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<PhaseTerms, E> {
        match v {
            "all" => Ok(PhaseTerms::All(v.to_string())),
            _ => Err(expected_got(TERMS_EXPECTED, Unexpected::Str(v))),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<PhaseTerms, A::Error> {
        let mut names = Vec::new();
        while let Some(n) = seq.next_element::<String>()? {
            names.push(n);
        }
        Ok(PhaseTerms::Names(names))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<PhaseTerms, E> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<PhaseTerms, E> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Signed(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<PhaseTerms, E> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Unsigned(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<PhaseTerms, E> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Float(v)))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<PhaseTerms, E> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Unit))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> std::result::Result<PhaseTerms, A::Error> {
        Err(expected_got(TERMS_EXPECTED, Unexpected::Map))
    }
}

/// One phase.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// End of the phase as a fraction of the run, in `(0, 1]`.
    pub until: f64,
    /// Active terms.
    pub terms: PhaseTerms,
}

/// Params of `curriculum`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CurriculumParams {
    /// Phases in order; the last must end at 1.0.
    pub phases: Vec<Phase>,
    /// Ramp length as a fraction of the run. Default 0.05.
    #[serde(default = "d_ramp")]
    pub ramp: f64,
}

fn d_ramp() -> f64 {
    0.05
}

/// Curriculum router.
pub struct CurriculumRouter {
    phases: Vec<Phase>,
    ramp: f64,
    gates: Vec<(String, f64)>,
}

impl CurriculumRouter {
    fn active(phase: &Phase, name: &str) -> bool {
        match &phase.terms {
            PhaseTerms::All(_) => true,
            PhaseTerms::Names(n) => n.iter().any(|x| x == name),
        }
    }

    /// The gate of term `name` at progress fraction `p`.
    pub fn gate(&self, name: &str, p: f64) -> f64 {
        let idx = self
            .phases
            .iter()
            .position(|ph| p < ph.until)
            .unwrap_or(self.phases.len() - 1);
        if !Self::active(&self.phases[idx], name) {
            return 0.0;
        }
        // Start of the contiguous run of phases (ending at idx) in which the term is active.
        let mut first = idx;
        while first > 0 && Self::active(&self.phases[first - 1], name) {
            first -= 1;
        }
        let start = if first == 0 { 0.0 } else { self.phases[first - 1].until };
        if start == 0.0 || self.ramp == 0.0 {
            return 1.0;
        }
        ((p - start) / self.ramp).clamp(0.0, 1.0)
    }
}

impl Router for CurriculumRouter {
    fn reads_step_outputs(&self) -> bool {
        false
    }
    fn weights(&mut self, s: &TermSignals) -> Result<Vec<f64>> {
        let p = s.progress.fraction();
        self.gates = s.names.iter().map(|n| (n.clone(), self.gate(n, p))).collect();
        Ok(s.base_weights
            .iter()
            .zip(&self.gates)
            .map(|(w, (_, g))| w * g)
            .collect())
    }

    fn check_terms(&self, names: &[String]) -> Result<()> {
        for (i, ph) in self.phases.iter().enumerate() {
            if let PhaseTerms::Names(n) = &ph.terms {
                for t in n {
                    if !names.contains(t) {
                        return Err(Error::config(
                            format!("router.phases[{i}].terms"),
                            format!("no loss term is named `{t}`; the terms are: {}", names.join(", ")),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn scalars(&self) -> Vec<(String, f64)> {
        self.gates.iter().map(|(n, g)| (format!("gate.{n}"), *g)).collect()
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn Router>> {
    let p: CurriculumParams = params.parse()?;
    if p.phases.is_empty() {
        return Err(params.error("phases", "expected at least one phase"));
    }
    let mut prev = 0.0;
    for (i, ph) in p.phases.iter().enumerate() {
        if !(ph.until > prev && ph.until <= 1.0) {
            return Err(params.error(
                &format!("phases[{i}].until"),
                format!("expected increasing values in (0, 1], got {}", ph.until),
            ));
        }
        prev = ph.until;
    }
    if prev != 1.0 {
        return Err(params.error("phases", "the last phase must end at until = 1.0"));
    }
    if !(0.0..=1.0).contains(&p.ramp) {
        return Err(params.error("ramp", format!("expected a fraction in [0, 1], got {}", p.ramp)));
    }
    Ok(Box::new(CurriculumRouter {
        phases: p.phases,
        ramp: p.ramp,
        gates: Vec::new(),
    }))
}

inventory::submit! {
    Factory::<dyn Router> {
        kind: "curriculum",
        description: "switches terms on in phases over progress, with linear ramps",
        build, params: retort_core::registry::params_schema::<CurriculumParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_core::Progress;

    fn router() -> Box<dyn Router> {
        let r = retort_core::Registry::empty();
        let ctx = BuildContext::new(&r, candle_core::Device::Cpu, 0);
        let p = Params::new(
            "router",
            serde_json::json!({"ramp": 0.1, "phases": [
                {"until": 0.3, "terms": ["kl"]},
                {"until": 0.6, "terms": ["kl", "hidden"]},
                {"until": 1.0, "terms": "all"}]})
            .as_object()
            .expect("o")
            .clone(),
        );
        build(&p, &ctx).expect("build")
    }

    #[test]
    fn terms_switch_on_with_ramps() {
        let mut r = router();
        let names: Vec<String> = ["kl", "hidden", "ce"].iter().map(|s| s.to_string()).collect();
        let at = |r: &mut Box<dyn Router>, step: usize| {
            r.weights(&TermSignals {
                names: &names,
                values: &[1.0; 3],
                base_weights: &[1.0, 2.0, 0.5],
                reads_features: &[false; 3],
                progress: Progress::new(step, 100),
            })
            .expect("w")
        };
        assert_eq!(at(&mut r, 0), vec![1.0, 0.0, 0.0]);
        assert_eq!(at(&mut r, 29), vec![1.0, 0.0, 0.0]);
        // hidden enters at 0.3 and ramps over 0.1: at 0.35 its gate is 0.5.
        let w = at(&mut r, 35);
        assert!((w[1] - 1.0).abs() < 1e-9 && w[2] == 0.0, "{w:?}");
        assert!((at(&mut r, 45)[1] - 2.0).abs() < 1e-12);
        let w = at(&mut r, 65);
        assert!((w[2] - 0.25).abs() < 1e-9, "{w:?}");
        assert_eq!(at(&mut r, 100), vec![1.0, 2.0, 0.5]);
        assert!(r.scalars().iter().any(|(k, _)| k == "gate.ce"));
    }

    #[test]
    fn terms_that_are_neither_all_nor_names_say_what_is_accepted() {
        let r = retort_core::Registry::empty();
        let ctx = BuildContext::new(&r, candle_core::Device::Cpu, 0);
        for (terms, got) in [
            (serde_json::json!("most"), "got a string \"most\""),
            (serde_json::json!(3), "got the number 3"),
        ] {
            let p = Params::new(
                "router",
                serde_json::json!({"phases": [{"until": 1.0, "terms": terms}]})
                    .as_object()
                    .expect("o")
                    .clone(),
            );
            let err = build(&p, &ctx).err().expect("must fail").to_string();
            assert!(
                err.contains("router.phases[0].terms")
                    && err.contains("expected \"all\" or a list of term names")
                    && err.contains(got),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_term_name_is_a_config_error() {
        let r = router();
        let err = r
            .check_terms(&["kl".to_string(), "ce".to_string()])
            .expect_err("must fail");
        assert!(
            err.to_string().contains("router.phases[1].terms") && err.to_string().contains("`hidden`"),
            "{err}"
        );
    }
}
