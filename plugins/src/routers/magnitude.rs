//! Router `magnitude`: magnitude-aware balancing, so that the configured weights act as shares
//! of the objective rather than raw multipliers of terms with very different scales.
//!
//! Per term `i` it keeps a bias-corrected exponential moving average of the term's magnitude,
//! `m_i <- decay * m_i + (1 - decay) * |L_i|`, `m̂_i = m_i / (1 - decay^n)` after `n` steps,
//! and returns `w_i = c_i * R / max(m̂_i, eps)` with `c_i` the configured weight and
//! `R = sum_j c_j m̂_j / sum_j c_j`. Then each weighted term contributes `c_i * R` on average:
//! in proportion to its configured share, with the same total scale as static weighting.
//! Terms with configured weight 0 stay at 0. The running magnitudes are logged as
//! `router.magnitude.<term>`. (GradNorm, Chen et al. 2018, balances gradient norms instead; this
//! uses loss magnitudes, which cost nothing extra.)
//!
//! ```toml
//! [router]
//! kind = "magnitude"
//! decay = 0.9
//! ```

use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Router, TermSignals};

/// Params of `magnitude`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MagnitudeParams {
    /// EMA decay in `[0, 1)`. Default 0.9.
    #[serde(default = "d_decay")]
    pub decay: f64,
    /// Floor on the magnitude. Default 1e-8.
    #[serde(default = "d_eps")]
    pub eps: f64,
}

fn d_decay() -> f64 {
    0.9
}
fn d_eps() -> f64 {
    1e-8
}

/// Magnitude-balancing router.
pub struct MagnitudeRouter {
    decay: f64,
    eps: f64,
    ema: Vec<f64>,
    steps: i32,
    names: Vec<String>,
}

impl MagnitudeRouter {
    fn corrected(&self) -> Vec<f64> {
        let c = 1.0 - self.decay.powi(self.steps);
        self.ema.iter().map(|m| m / c.max(1e-300)).collect()
    }
}

impl Router for MagnitudeRouter {
    fn weights(&mut self, s: &TermSignals) -> Result<Vec<f64>> {
        if self.ema.len() != s.values.len() {
            self.ema = vec![0.0; s.values.len()];
            self.steps = 0;
            self.names = s.names.to_vec();
        }
        self.steps += 1;
        for (m, v) in self.ema.iter_mut().zip(s.values) {
            *m = self.decay * *m + (1.0 - self.decay) * v.abs();
        }
        let mags = self.corrected();
        let total_c: f64 = s.base_weights.iter().sum();
        let reference = if total_c != 0.0 {
            s.base_weights.iter().zip(&mags).map(|(c, m)| c * m).sum::<f64>() / total_c
        } else {
            0.0
        };
        Ok(s.base_weights
            .iter()
            .zip(&mags)
            .map(|(c, m)| {
                if *c == 0.0 {
                    0.0
                } else {
                    c * reference / m.max(self.eps)
                }
            })
            .collect())
    }

    fn scalars(&self) -> Vec<(String, f64)> {
        self.names
            .iter()
            .zip(self.corrected())
            .map(|(n, m)| (format!("magnitude.{n}"), m))
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({"ema": self.ema, "steps": self.steps, "names": self.names})
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<()> {
        #[derive(Deserialize)]
        struct S {
            ema: Vec<f64>,
            steps: i32,
            names: Vec<String>,
        }
        let s: S = serde_json::from_value(state.clone())
            .map_err(|e| retort_core::Error::failed("magnitude router state", e))?;
        (self.ema, self.steps, self.names) = (s.ema, s.steps, s.names);
        Ok(())
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn Router>> {
    let p: MagnitudeParams = params.parse()?;
    if !(0.0..1.0).contains(&p.decay) {
        return Err(params.error("decay", format!("expected a number in [0, 1), got {}", p.decay)));
    }
    params.require_positive("eps", p.eps)?;
    Ok(Box::new(MagnitudeRouter {
        decay: p.decay,
        eps: p.eps,
        ema: Vec::new(),
        steps: 0,
        names: Vec::new(),
    }))
}

inventory::submit! {
    Factory::<dyn Router> {
        kind: "magnitude",
        description: "normalises each term by its running magnitude so the configured weights hold as shares",
        build, params: retort_core::registry::params_schema::<MagnitudeParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retort_core::Progress;

    #[test]
    fn weighted_contributions_follow_the_configured_shares() {
        let mut r = MagnitudeRouter {
            decay: 0.5,
            eps: 1e-8,
            ema: Vec::new(),
            steps: 0,
            names: Vec::new(),
        };
        let names = vec!["kl".to_string(), "hidden".to_string(), "off".to_string()];
        let base = [0.7, 0.3, 0.0];
        let mut w = Vec::new();
        for step in 0..20 {
            // Terms on very different scales: 2.0 and 400.0.
            let values = [2.0, 400.0, 5.0];
            w = r
                .weights(&TermSignals {
                    names: &names,
                    values: &values,
                    base_weights: &base,
                    reads_features: &[false; 3],
                    progress: Progress::new(step, 20),
                })
                .expect("weights");
        }
        let contrib: Vec<f64> = w.iter().zip([2.0, 400.0, 5.0]).map(|(w, v)| w * v).collect();
        // Shares 0.7 : 0.3, the total equal to static weighting's 0.7 * 2 + 0.3 * 400.
        assert!(
            (contrib[0] / (contrib[0] + contrib[1]) - 0.7).abs() < 1e-9,
            "{contrib:?}"
        );
        assert!((contrib[0] + contrib[1] - (0.7 * 2.0 + 0.3 * 400.0)).abs() < 1e-6);
        assert_eq!(w[2], 0.0);
        let logged = r.scalars();
        assert_eq!(logged[1].0, "magnitude.hidden");
        assert!((logged[1].1 - 400.0).abs() < 1e-9);
    }
}
