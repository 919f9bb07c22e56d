//! Numeric parameters that are a number or a schedule of training progress.
//!
//! ```toml
//! temperature = 2.0
//! temperature = { kind = "linear", start = 3.0, end = 2.0 }
//! ```

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::ComponentSpec;
use crate::de::expected_got;
use crate::{BuildContext, Error, Progress, Result, Schedule};

/// Config form: a number or a schedule component.
#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ScalarSpec {
    /// A constant.
    Number(f64),
    /// A registered schedule kind with its params.
    Schedule(ComponentSpec),
}

/// What a number-or-schedule value accepts, for messages.
const EXPECTED: &str = "a number or a schedule table { kind = \"linear\", ... }";

/// A finite number, or a table with a string `kind`; anything else is refused saying so.
impl<'de> Deserialize<'de> for ScalarSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = ScalarSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<ScalarSpec, E> {
        if v.is_finite() {
            Ok(ScalarSpec::Number(v))
        } else {
            Err(E::custom(format!("expected a finite number, got {v}")))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<ScalarSpec, E> {
        Ok(ScalarSpec::Number(v as f64))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<ScalarSpec, E> {
        Ok(ScalarSpec::Number(v as f64))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<ScalarSpec, E> {
        Err(expected_got(EXPECTED, Unexpected::Str(v)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<ScalarSpec, E> {
        Err(expected_got(EXPECTED, Unexpected::Bool(v)))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<ScalarSpec, E> {
        Err(expected_got(EXPECTED, Unexpected::Unit))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> std::result::Result<ScalarSpec, A::Error> {
        Err(expected_got(EXPECTED, Unexpected::Seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> std::result::Result<ScalarSpec, A::Error> {
        let mut table = Map::new();
        while let Some((k, v)) = access.next_entry::<String, Value>()? {
            table.insert(k, v);
        }
        match table.get("kind") {
            Some(Value::String(_)) => ComponentSpec::deserialize(Value::Object(table))
                .map(ScalarSpec::Schedule)
                .map_err(de::Error::custom),
            Some(other) => Err(de::Error::custom(format!(
                "expected {EXPECTED}; got a table whose `kind` is {other} (a schedule's name is a string)"
            ))),
            None => Err(de::Error::custom(format!(
                "expected {EXPECTED}; got a table without `kind` (the schedule's name)"
            ))),
        }
    }
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

    /// Builds and checks a softmax temperature: within [`TEMPERATURE_RANGE`] everywhere.
    pub fn build_temperature(&self, path: &str, ctx: &BuildContext) -> Result<Scalar> {
        let s = self.build(path, ctx)?;
        let (lo, hi) = TEMPERATURE_RANGE;
        let what = format!(
            "a temperature in [{lo}, {hi}] (beyond it, logits / T or the T^2 gradient scale leave the range of f32)"
        );
        s.check(path, |v| (lo..=hi).contains(&v), &what)?;
        Ok(s)
    }

    /// Builds and checks `lo <= value <= hi` everywhere.
    pub fn build_in(&self, path: &str, ctx: &BuildContext, lo: f64, hi: f64) -> Result<Scalar> {
        let s = self.build(path, ctx)?;
        s.check(path, |v| v >= lo && v <= hi, &format!("a number in [{lo}, {hi}]"))?;
        Ok(s)
    }
}

/// The softmax temperatures a loss accepts: wide enough for every published recipe
/// (InfoNCE's 0.01-0.1, KD's 1-20), narrow enough that f32 stays finite.
pub const TEMPERATURE_RANGE: (f64, f64) = (1e-3, 1e3);

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
    fn anything_else_is_refused_saying_what_is_accepted() {
        let msg = |v: serde_json::Value| {
            serde_json::from_value::<ScalarSpec>(v)
                .expect_err("must fail")
                .to_string()
        };
        let m = msg(serde_json::json!("abc"));
        assert!(
            m.contains("expected a number or a schedule table { kind = \"linear\", ... }; got a string \"abc\""),
            "{m}"
        );
        assert!(msg(serde_json::json!([1.0])).contains("got a list"));
        assert!(msg(serde_json::json!({"start": 1.0})).contains("without `kind`"));
        assert!(msg(serde_json::json!({"kind": 3})).contains("`kind` is 3"));
        use serde::de::IntoDeserializer;
        let nan: serde::de::value::F64Deserializer<serde::de::value::Error> = f64::NAN.into_deserializer();
        let m = ScalarSpec::deserialize(nan).expect_err("nan").to_string();
        assert!(m.contains("finite"), "{m}");
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
