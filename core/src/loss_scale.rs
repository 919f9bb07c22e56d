//! `train.loss_scale`: how the loss is scaled before the backward pass so that half-precision
//! gradients do not underflow (Micikevicius et al., 2018, "Mixed Precision Training").
//!
//! ```toml
//! [train]
//! loss_scale = "auto"     # dynamic where the student computes in f16, none otherwise (default)
//! loss_scale = "dynamic"  # start at 2^16, halve on an overflow (the step is skipped), double
//!                         # after 2,000 steps in a row without one
//! loss_scale = "none"
//! loss_scale = 1024       # a fixed scale
//! ```
//!
//! The gradients are divided by the scale before their norm, clipping and the update, so a
//! scale that is a power of two changes nothing in f32/f64 arithmetic short of an overflow.

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::de::expected_got;

/// How the loss is scaled before the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Default, schemars::JsonSchema)]
pub enum LossScale {
    /// Dynamic where the student computes in f16, none otherwise.
    #[default]
    Auto,
    /// Dynamic: start at [`DYNAMIC_INIT`], halve on an overflow, double after
    /// [`DYNAMIC_INTERVAL`] steps without one.
    Dynamic,
    /// No scaling.
    None,
    /// A fixed positive scale.
    Fixed(f64),
}

/// The first scale of [`LossScale::Dynamic`]: 2^16.
pub const DYNAMIC_INIT: f64 = 65_536.0;
/// Steps in a row without an overflow after which a dynamic scale doubles.
pub const DYNAMIC_INTERVAL: usize = 2_000;

const EXPECTED: &str = "\"auto\", \"dynamic\", \"none\" or a positive number";

impl Serialize for LossScale {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            LossScale::Auto => s.serialize_str("auto"),
            LossScale::Dynamic => s.serialize_str("dynamic"),
            LossScale::None => s.serialize_str("none"),
            LossScale::Fixed(v) => s.serialize_f64(*v),
        }
    }
}

impl<'de> Deserialize<'de> for LossScale {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(LossScaleVisitor)
    }
}

struct LossScaleVisitor;

impl<'de> Visitor<'de> for LossScaleVisitor {
    type Value = LossScale;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<LossScale, E> {
        match v {
            "auto" => Ok(LossScale::Auto),
            "dynamic" => Ok(LossScale::Dynamic),
            "none" => Ok(LossScale::None),
            _ => Err(expected_got(EXPECTED, Unexpected::Str(v))),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<LossScale, E> {
        if v.is_finite() && v > 0.0 {
            Ok(LossScale::Fixed(v))
        } else {
            Err(expected_got(EXPECTED, Unexpected::Float(v)))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<LossScale, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<LossScale, E> {
        self.visit_f64(v as f64)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<LossScale, E> {
        Err(expected_got(EXPECTED, Unexpected::Bool(v)))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> std::result::Result<LossScale, A::Error> {
        Err(expected_got(EXPECTED, Unexpected::Seq))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> std::result::Result<LossScale, A::Error> {
        Err(expected_got(EXPECTED, Unexpected::Map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json_value: &str) -> std::result::Result<LossScale, String> {
        serde_json::from_str::<LossScale>(json_value).map_err(|e| e.to_string())
    }

    #[test]
    fn names_and_positive_numbers_are_read_and_written_back() {
        for (text, want) in [
            ("\"auto\"", LossScale::Auto),
            ("\"dynamic\"", LossScale::Dynamic),
            ("\"none\"", LossScale::None),
            ("1024", LossScale::Fixed(1024.0)),
            ("0.5", LossScale::Fixed(0.5)),
        ] {
            assert_eq!(parse(text), Ok(want), "{text}");
            let json = serde_json::to_string(&want).expect("json");
            assert_eq!(serde_json::from_str::<LossScale>(&json).expect("back"), want);
        }
    }

    #[test]
    fn anything_else_is_refused_saying_what_is_expected() {
        for bad in ["\"static\"", "0", "-2", "true", "[2]"] {
            let err = parse(bad).expect_err(bad);
            assert!(
                err.contains("\"auto\", \"dynamic\", \"none\" or a positive number"),
                "{bad}: {err}"
            );
        }
    }
}
