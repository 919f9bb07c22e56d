//! `dwa`: Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning
//! with Attention"), as a plugin router.
//!
//! A term whose loss falls slowly gets more weight. With `L_i(k)` the term's value at step `k`
//! (smoothed by an EMA with `decay`) and the descent rate `r_i = L_i(k-1) / L_i(k-2)`:
//! `w_i = C * c_i exp(r_i / T) / sum_j c_j exp(r_j / T)` with `c_i` the configured weights and
//! `C = sum_j c_j` (equal rates give back the configured weights; the total stays `C`, where
//! the original DWA, with unit weights, sums to the number of tasks). Configured weights are
//! used as-is for the first two steps. The rates are logged as `router.rate.<term>`.
//!
//! ```toml
//! [plugins]
//! paths = ["target/release/libretort_plugin_router.so"]
//!
//! [router]
//! kind = "dwa"
//! temperature = 2.0
//! ```

use retort_sdk::prelude::*;
use serde::Deserialize;

/// Params of `dwa`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DwaParams {
    /// Softness `T > 0`: large T -> equal weights. Default 2.0.
    #[serde(default = "two")]
    temperature: f64,
    /// EMA decay of the term values in `[0, 1)`. Default 0.9.
    #[serde(default = "decay")]
    decay: f64,
}

fn two() -> f64 {
    2.0
}
fn decay() -> f64 {
    0.9
}

/// The router.
pub struct Dwa {
    temperature: f64,
    decay: f64,
    ema: Vec<f64>,
    history: Vec<Vec<f64>>,
    names: Vec<String>,
    rates: Vec<f64>,
}

impl Router for Dwa {
    fn weights(&mut self, s: &TermSignals) -> Result<Vec<f64>> {
        if self.ema.len() != s.values.len() {
            self.ema = s.values.to_vec();
            self.names = s.names.to_vec();
        } else {
            for (e, v) in self.ema.iter_mut().zip(s.values) {
                *e = self.decay * *e + (1.0 - self.decay) * v;
            }
        }
        self.history.push(self.ema.clone());
        if self.history.len() > 2 {
            self.history.remove(0);
        }
        if self.history.len() < 2 {
            return Ok(s.base_weights.to_vec());
        }
        let (prev, last) = (&self.history[0], &self.history[1]);
        self.rates = last
            .iter()
            .zip(prev)
            .map(|(l, p)| if p.abs() > 1e-12 { l / p } else { 1.0 })
            .collect();
        let total_c: f64 = s.base_weights.iter().sum();
        if total_c == 0.0 {
            return Ok(s.base_weights.to_vec());
        }
        let exps: Vec<f64> = self
            .rates
            .iter()
            .zip(s.base_weights)
            .map(|(r, c)| c * (r / self.temperature).exp())
            .collect();
        let z: f64 = exps.iter().sum();
        Ok(exps.iter().map(|e| total_c * e / z).collect())
    }

    fn scalars(&self) -> Vec<(String, f64)> {
        self.names
            .iter()
            .zip(&self.rates)
            .map(|(n, r)| (format!("rate.{n}"), *r))
            .collect()
    }

    fn state(&self) -> retort_sdk::serde_json::Value {
        retort_sdk::serde_json::json!({"ema": self.ema, "history": self.history, "names": self.names, "rates": self.rates})
    }

    fn restore(&mut self, state: &retort_sdk::serde_json::Value) -> Result<()> {
        #[derive(Deserialize)]
        struct S {
            ema: Vec<f64>,
            history: Vec<Vec<f64>>,
            names: Vec<String>,
            rates: Vec<f64>,
        }
        let s: S = retort_sdk::serde_json::from_value(state.clone()).map_err(|e| Error::failed("dwa state", e))?;
        (self.ema, self.history, self.names, self.rates) = (s.ema, s.history, s.names, s.rates);
        Ok(())
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn Router>> {
    let p: DwaParams = params.parse()?;
    params.require_positive("temperature", p.temperature)?;
    if !(0.0..1.0).contains(&p.decay) {
        return Err(params.error("decay", format!("expected a number in [0, 1), got {}", p.decay)));
    }
    Ok(Box::new(Dwa {
        temperature: p.temperature,
        decay: p.decay,
        ema: Vec::new(),
        history: Vec::new(),
        names: Vec::new(),
        rates: Vec::new(),
    }))
}

/// Registers the plugin's kinds.
pub fn register(r: &mut dyn Registrar) {
    r.router(Factory {
        kind: "dwa",
        description: "Dynamic Weight Average: more weight to terms whose loss falls slowest (plugin)",
        build,
        params: retort_sdk::registry::params_schema::<DwaParams>,
    });
}

retort_sdk::export_plugin!(register);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_terms_gain_weight() {
        let mut r = Dwa {
            temperature: 1.0,
            decay: 0.0,
            ema: Vec::new(),
            history: Vec::new(),
            names: Vec::new(),
            rates: Vec::new(),
        };
        let names = vec!["fast".to_string(), "slow".to_string()];
        let mut w = Vec::new();
        for (a, b) in [(4.0, 4.0), (2.0, 3.9), (1.0, 3.8)] {
            w = r
                .weights(&TermSignals {
                    names: &names,
                    values: &[a, b],
                    base_weights: &[0.5, 0.5],
                    reads_features: &[false, false],
                    progress: Progress::new(0, 1),
                })
                .expect("w");
        }
        // Rates 0.5 and 3.8/3.9; reference w_i = 1.0 * 0.5 e^{r_i} / (0.5 e^{r_f} + 0.5 e^{r_s}).
        let (rf, rs): (f64, f64) = (0.5, 3.8 / 3.9);
        let z = rf.exp() + rs.exp();
        assert!(
            (w[0] - rf.exp() / z).abs() < 1e-12 && (w[1] - rs.exp() / z).abs() < 1e-12,
            "{w:?}"
        );
        assert!(w[1] > w[0]);
    }
}
