//! Router `static`: every term keeps its configured `weight`, every step.
//!
//! ```toml
//! [router]
//! kind = "static"
//! ```

use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Router, TermSignals};

/// The configured weights, unchanged.
pub struct StaticRouter;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoParams {}

impl Router for StaticRouter {
    fn reads_step_outputs(&self) -> bool {
        false
    }
    fn weights(&mut self, signals: &TermSignals) -> Result<Vec<f64>> {
        Ok(signals.base_weights.to_vec())
    }
}

fn build(params: &Params, _: &BuildContext) -> Result<Box<dyn Router>> {
    params.parse::<NoParams>()?;
    Ok(Box::new(StaticRouter))
}

inventory::submit! {
    Factory::<dyn Router> { kind: "static", description: "the configured per-term weights, unchanged", build, params: retort_core::registry::no_params }
}
