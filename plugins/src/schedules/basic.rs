//! Schedules `constant`, `linear`, `cosine` and `warmup_cosine`.
//!
//! With `p = step / total` in `[0, 1]`:
//! - `constant`: `value`.
//! - `linear`: `start + (end - start) * p`.
//! - `cosine`: `end + (start - end) * (1 + cos(pi * p)) / 2`.
//! - `warmup_cosine` (a learning-rate factor; Loshchilov & Hutter, 2017, with linear warmup):
//!   `(step + 1) / w` for the first `w = ceil(warmup * total)` steps, then cosine from 1 down
//!   to `min_ratio` over the rest.
//!
//! ```toml
//! lr_schedule = { kind = "warmup_cosine", warmup = 0.05, min_ratio = 0.1 }
//! ```

use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Progress, Result, Schedule};

/// `constant`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    /// The value. Default 1.0.
    #[serde(default = "one")]
    pub value: f64,
}

fn one() -> f64 {
    1.0
}

impl Schedule for Constant {
    fn value(&self, _: Progress) -> f64 {
        self.value
    }
}

/// `linear` from `start` to `end`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Linear {
    /// Value at progress 0.
    pub start: f64,
    /// Value at progress 1.
    pub end: f64,
}

impl Schedule for Linear {
    fn value(&self, p: Progress) -> f64 {
        self.start + (self.end - self.start) * p.fraction()
    }
}

/// `cosine` from `start` to `end`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cosine {
    /// Value at progress 0.
    pub start: f64,
    /// Value at progress 1.
    pub end: f64,
}

impl Schedule for Cosine {
    fn value(&self, p: Progress) -> f64 {
        self.end + (self.start - self.end) * 0.5 * (1.0 + (std::f64::consts::PI * p.fraction()).cos())
    }
}

/// `warmup_cosine`: linear warmup to 1, then cosine to `min_ratio`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmupCosine {
    /// Fraction of the steps spent warming up, in `[0, 1)`. Default 0.05.
    #[serde(default = "default_warmup")]
    pub warmup: f64,
    /// Final factor, in `[0, 1]`. Default 0.1.
    #[serde(default = "default_min_ratio")]
    pub min_ratio: f64,
}

fn default_warmup() -> f64 {
    0.05
}
fn default_min_ratio() -> f64 {
    0.1
}

impl Schedule for WarmupCosine {
    fn value(&self, p: Progress) -> f64 {
        let warm = (self.warmup * p.total as f64).ceil() as usize;
        if p.step < warm {
            return (p.step + 1) as f64 / warm as f64;
        }
        let rest = p.total.saturating_sub(warm).max(1);
        let q = ((p.step - warm) as f64 / rest as f64).clamp(0.0, 1.0);
        self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * q).cos())
    }
}

fn build_constant(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    Ok(Box::new(params.parse::<Constant>()?))
}
fn build_linear(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    Ok(Box::new(params.parse::<Linear>()?))
}
fn build_cosine(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    Ok(Box::new(params.parse::<Cosine>()?))
}
fn build_warmup_cosine(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s: WarmupCosine = params.parse()?;
    if !(0.0..1.0).contains(&s.warmup) {
        return Err(params.error("warmup", format!("expected a fraction in [0, 1), got {}", s.warmup)));
    }
    if !(0.0..=1.0).contains(&s.min_ratio) {
        return Err(params.error("min_ratio", format!("expected a number in [0, 1], got {}", s.min_ratio)));
    }
    Ok(Box::new(s))
}

inventory::submit! { Factory::<dyn Schedule> { kind: "constant", description: "a constant value", build: build_constant, params: retort_core::registry::params_schema::<Constant> } }
inventory::submit! { Factory::<dyn Schedule> { kind: "linear", description: "linear from start to end over the run", build: build_linear, params: retort_core::registry::params_schema::<Linear> } }
inventory::submit! { Factory::<dyn Schedule> { kind: "cosine", description: "cosine from start to end over the run", build: build_cosine, params: retort_core::registry::params_schema::<Cosine> } }
inventory::submit! {
    Factory::<dyn Schedule> {
        kind: "warmup_cosine",
        description: "learning-rate factor: linear warmup to 1, then cosine decay to min_ratio",
        build: build_warmup_cosine, params: retort_core::registry::params_schema::<WarmupCosine> }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_reference_points() {
        let s = WarmupCosine {
            warmup: 0.1,
            min_ratio: 0.1,
        };
        // 100 steps: warm = 10; step 0 -> 1/10; step 9 -> 1; step 10 -> cos start = 1.
        assert!((s.value(Progress::new(0, 100)) - 0.1).abs() < 1e-12);
        assert!((s.value(Progress::new(9, 100)) - 1.0).abs() < 1e-12);
        assert!((s.value(Progress::new(10, 100)) - 1.0).abs() < 1e-12);
        // Midway through the decay (q = 0.5): 0.1 + 0.9 * 0.5 = 0.55.
        assert!((s.value(Progress::new(55, 100)) - 0.55).abs() < 1e-12);
        assert!((s.value(Progress::new(100, 100)) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn linear_and_cosine_endpoints() {
        let l = Linear { start: 3.0, end: 2.0 };
        assert_eq!(l.value(Progress::new(0, 10)), 3.0);
        assert_eq!(l.value(Progress::new(5, 10)), 2.5);
        let c = Cosine { start: 1.0, end: 0.0 };
        assert!((c.value(Progress::new(10, 10))).abs() < 1e-12);
        assert!((c.value(Progress::new(5, 10)) - 0.5).abs() < 1e-12);
    }
}
