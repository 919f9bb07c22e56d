//! Schedules `step`, `exponential` and `piecewise`.
//!
//! With `p = step / total` in `[0, 1]`:
//! - `step`: `start * factor^floor(p / every)` (e.g. halve every quarter of the run).
//! - `exponential`: geometric from `start` to `end`: `start * (end / start)^p` (both > 0).
//! - `piecewise`: linear interpolation between `points = [[p0, v0], [p1, v1], ...]`
//!   (strictly increasing `p` in `[0, 1]`), constant before the first and after the last point.
//!
//! ```toml
//! temperature = { kind = "piecewise", points = [[0.0, 4.0], [0.3, 2.0], [1.0, 1.0]] }
//! weight = { kind = "step", start = 1.0, factor = 0.5, every = 0.25 }
//! ```

use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Progress, Result, Schedule};

/// `step`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Value at progress 0.
    pub start: f64,
    /// Multiplier applied at each step boundary.
    pub factor: f64,
    /// Fraction of the run between boundaries, in `(0, 1]`.
    pub every: f64,
}

impl Schedule for Step {
    fn value(&self, p: Progress) -> f64 {
        let k = (p.fraction() / self.every + 1e-12).floor();
        self.start * self.factor.powf(k)
    }
}

/// `exponential`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Exponential {
    /// Value at progress 0 (> 0).
    pub start: f64,
    /// Value at progress 1 (> 0).
    pub end: f64,
}

impl Schedule for Exponential {
    fn value(&self, p: Progress) -> f64 {
        self.start * (self.end / self.start).powf(p.fraction())
    }
}

/// `piecewise`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Piecewise {
    /// `[progress, value]` pairs.
    pub points: Vec<[f64; 2]>,
}

impl Schedule for Piecewise {
    fn value(&self, p: Progress) -> f64 {
        let x = p.fraction();
        let pts = &self.points;
        if x <= pts[0][0] {
            return pts[0][1];
        }
        for w in pts.windows(2) {
            let ([x0, y0], [x1, y1]) = (w[0], w[1]);
            if x <= x1 {
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
            }
        }
        pts[pts.len() - 1][1]
    }
}

fn build_step(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s: Step = params.parse()?;
    if !(s.every > 0.0 && s.every <= 1.0) {
        return Err(params.error("every", format!("expected a fraction in (0, 1], got {}", s.every)));
    }
    if !s.factor.is_finite() || !s.start.is_finite() {
        return Err(params.error("factor", "start and factor must be finite"));
    }
    Ok(Box::new(s))
}

fn build_exponential(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s: Exponential = params.parse()?;
    params.require_positive("start", s.start)?;
    params.require_positive("end", s.end)?;
    Ok(Box::new(s))
}

fn build_piecewise(params: &Params, _: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s: Piecewise = params.parse()?;
    if s.points.is_empty() {
        return Err(params.error("points", "expected at least one [progress, value] point"));
    }
    for (i, [x, y]) in s.points.iter().enumerate() {
        if !(0.0..=1.0).contains(x) || !y.is_finite() {
            return Err(params.error(
                &format!("points[{i}]"),
                format!("expected progress in [0, 1] and a finite value, got [{x}, {y}]"),
            ));
        }
        if i > 0 && *x <= s.points[i - 1][0] {
            return Err(params.error(&format!("points[{i}]"), "progress must be strictly increasing"));
        }
    }
    Ok(Box::new(s))
}

inventory::submit! { Factory::<dyn Schedule> { kind: "step", description: "start * factor^floor(progress / every)", build: build_step, params: retort_core::registry::params_schema::<Step> } }
inventory::submit! { Factory::<dyn Schedule> { kind: "exponential", description: "geometric from start to end over the run", build: build_exponential, params: retort_core::registry::params_schema::<Exponential> } }
inventory::submit! { Factory::<dyn Schedule> { kind: "piecewise", description: "linear between [progress, value] points", build: build_piecewise, params: retort_core::registry::params_schema::<Piecewise> } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_points() {
        let s = Step {
            start: 1.0,
            factor: 0.5,
            every: 0.25,
        };
        assert_eq!(s.value(Progress::new(0, 100)), 1.0);
        assert_eq!(s.value(Progress::new(24, 100)), 1.0);
        assert_eq!(s.value(Progress::new(25, 100)), 0.5);
        assert_eq!(s.value(Progress::new(100, 100)), 1.0 / 16.0);
        let e = Exponential { start: 4.0, end: 1.0 };
        assert!((e.value(Progress::new(5, 10)) - 2.0).abs() < 1e-12);
        let p = Piecewise {
            points: vec![[0.0, 4.0], [0.5, 2.0], [1.0, 1.0]],
        };
        assert_eq!(p.value(Progress::new(0, 4)), 4.0);
        assert!((p.value(Progress::new(1, 4)) - 3.0).abs() < 1e-12);
        assert!((p.value(Progress::new(3, 4)) - 1.5).abs() < 1e-12);
        let late = Piecewise {
            points: vec![[0.5, 2.0]],
        };
        assert_eq!(late.value(Progress::new(0, 4)), 2.0);
    }

    #[test]
    fn invalid_points_name_the_index() {
        let r = retort_core::Registry::empty();
        let ctx = BuildContext::new(&r, candle_core::Device::Cpu, 0);
        let p = Params::new(
            "loss[0].temperature",
            serde_json::json!({"points": [[0.0, 1.0], [0.0, 2.0]]})
                .as_object()
                .expect("o")
                .clone(),
        );
        let err = build_piecewise(&p, &ctx).err().expect("must fail");
        assert!(err.to_string().contains("loss[0].temperature.points[1]"), "{err}");
    }
}
