//! Deserializers that read `null` as NaN: JSON has no NaN, so serde_json writes non-finite
//! numbers as `null`; records and reports read them back as NaN instead of failing.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// A number, or `null` as NaN.
pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A map of numbers, `null` values as NaN.
pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}
