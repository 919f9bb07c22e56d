//! Numeric parameters that are a number or a schedule of training progress.
//!
//! ```toml
//! temperature = 2.0
//! temperature = { kind = "linear", start = 3.0, end = 2.0 }
//! ```

use serde::{Deserialize, Serialize};

use crate::config::ComponentSpec;
use crate::{BuildContext, Error, Progress, Result, Schedule};

/// Config form: a number or a schedule component.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ScalarSpec {
    /// A constant.
    Number(f64),
    /// A registered schedule kind with its params.
    Schedule(ComponentSpec),
}

/// `0.5`, or `linear(end=1.0, start=3.0)` for a schedule.
impl std::fmt::Display for ScalarSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScalarSpec::Number(v) => write!(f, "{v}"),
            ScalarSpec::Schedule(c) => {
                let args: Vec<String> = c.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "{}({})", c.kind, args.join(", "))
            }
        }
    }
}

impl From<f64> for ScalarSpec {
    fn from(v: f64) -> Self {
        ScalarSpec::Number(v)
    }
}

/// Runtime form: evaluates to a value at any progress.
pub enum Scalar {
    /// A constant.
    Const(f64),
    /// A schedule.
    Scheduled(Box<dyn Schedule>),
}

impl std::fmt::Debug for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Const(v) => write!(f, "Const({v})"),
            Scalar::Scheduled(_) => write!(f, "Scheduled(..)"),
        }
    }
}

/// Progress points at which a scheduled value is checked against its valid range.
const CHECK_POINTS: usize = 100;

impl Scalar {
    /// The value at `progress`.
    pub fn at(&self, progress: Progress) -> f64 {
        match self {
            Scalar::Const(v) => *v,
            Scalar::Scheduled(s) => s.value(progress),
        }
    }

    /// Whether the value never changes.
    pub fn is_constant(&self) -> bool {
        matches!(self, Scalar::Const(_))
    }

    /// Checks `valid` at progress 0, 1% .. 100%; a violation is a config error at `path` saying
    /// what was `expected` and the first offending value.
    pub fn check(&self, path: &str, valid: impl Fn(f64) -> bool, expected: &str) -> Result<()> {
        let points = if self.is_constant() { 1 } else { CHECK_POINTS + 1 };
        for i in 0..points {
            let p = Progress::new(i, CHECK_POINTS);
            let v = self.at(p);
            if !valid(v) {
                let when = if self.is_constant() {
                    String::new()
                } else {
                    format!(" at {i}% of training")
                };
                return Err(Error::config(path, format!("expected {expected}, got {v}{when}")));
            }
        }
        Ok(())
    }
}

impl ScalarSpec {
    /// Builds the runtime value; `path` is the key path of this parameter.
    pub fn build(&self, path: &str, ctx: &BuildContext) -> Result<Scalar> {
        Ok(match self {
            ScalarSpec::Number(v) => Scalar::Const(*v),
            ScalarSpec::Schedule(spec) => {
                Scalar::Scheduled(ctx.registry.schedules.build(&spec.kind, &spec.params_at(path), ctx)?)
            }
        })
    }

    /// Builds and checks `value > 0` (finite) everywhere.
    pub fn build_positive(&self, path: &str, ctx: &BuildContext) -> Result<Scalar> {
        let s = self.build(path, ctx)?;
        s.check(path, |v| v.is_finite() && v > 0.0, "a finite number > 0")?;
        Ok(s)
    }

    /// Builds and checks `lo <= value <= hi` everywhere.
    pub fn build_in(&self, path: &str, ctx: &BuildContext, lo: f64, hi: f64) -> Result<Scalar> {
        let s = self.build(path, ctx)?;
        s.check(path, |v| v >= lo && v <= hi, &format!("a number in [{lo}, {hi}]"))?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;
    use candle_core::Device;

    #[test]
    fn numbers_and_tables_deserialize() {
        let n: ScalarSpec = serde_json::from_value(serde_json::json!(2.5)).expect("number");
        assert_eq!(n, ScalarSpec::Number(2.5));
        let s: ScalarSpec =
            serde_json::from_value(serde_json::json!({"kind": "linear", "start": 3.0, "end": 2.0})).expect("table");
        assert!(matches!(s, ScalarSpec::Schedule(ref c) if c.kind == "linear"));
    }

    #[test]
    fn constant_range_check_names_the_path() {
        let r = Registry::empty();
        let ctx = BuildContext::new(&r, Device::Cpu, 0);
        let err = ScalarSpec::Number(-1.0)
            .build_positive("loss[0].temperature", &ctx)
            .expect_err("must fail");
        assert!(
            err.to_string().contains("loss[0].temperature") && err.to_string().contains("> 0"),
            "{err}"
        );
        let ok = ScalarSpec::Number(0.5)
            .build_in("loss[0].beta", &ctx, 0.0, 1.0)
            .expect("in range");
        assert_eq!(ok.at(Progress::new(3, 10)), 0.5);
    }
}
