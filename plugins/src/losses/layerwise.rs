//! `layerwise`: progressive layer matching. The hidden-state pairs of `hidden_mse` /
//! `hidden_cosine` are switched on one after another as a `frontier` schedule advances
//! (progressive knowledge transfer in the spirit of Sun et al. 2019, "Patient Knowledge
//! Distillation", and of stage-wise FitNets training).
//!
//! With `n` pairs in `order` (`bottom_up` by default: shallow pairs first) and frontier
//! `a(p) in [0, 1]` (default `{ kind = "linear", start = 0.0, end = 1.0 }`), pair `k`
//! (0-based) has weight `w_k = clamp(a * n - k, 0, 1)`: pair 0 ramps in first, the last pair is
//! fully on when `a = 1`. `L = sum_k w_k d_k / max(sum_k w_k, 1)`, with `d_k` the pair's MSE or
//! `1 - cos` (projections as in `hidden_mse`). The frontier and every `w_k` are logged.
//!
//! ```toml
//! [[loss]]
//! kind = "layerwise"
//! distance = "mse"
//! map = "uniform"
//! frontier = { kind = "linear", start = 0.0, end = 1.0 }
//! ```

use candle_core::{Tensor, Var};
use serde::Deserialize;
use serde_json::Value;

use retort_core::registry::Factory;
use retort_core::{BuildContext, LossTerm, Params, Progress, Result, Scalar, ScalarSpec, StepContext};

use super::hidden::{Distance, HiddenMatch};

/// Params of `layerwise` besides the pair params of `hidden_mse` (`layers`, `map`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LayerwiseParams {
    #[serde(default = "d_distance")]
    distance: String,
    #[serde(default = "d_order")]
    order: String,
    #[serde(default = "d_frontier")]
    frontier: ScalarSpec,
    #[allow(dead_code)]
    layers: Option<Value>,
    #[allow(dead_code)]
    map: Option<Value>,
}

fn d_distance() -> String {
    "mse".into()
}
fn d_order() -> String {
    "bottom_up".into()
}
fn d_frontier() -> ScalarSpec {
    let mut c = retort_core::config::ComponentSpec::new("linear");
    c.params.insert("start".into(), 0.0.into());
    c.params.insert("end".into(), 1.0.into());
    ScalarSpec::Schedule(c)
}

/// Progressive layer matching.
pub struct Layerwise {
    inner: HiddenMatch,
    frontier: Scalar,
    top_down: bool,
}

impl Layerwise {
    /// Weight of each pair (in configured order) at `progress`.
    pub fn pair_weights(&self, progress: Progress) -> Vec<f64> {
        let n = self.inner.num_pairs();
        let a = self.frontier.at(progress);
        (0..n)
            .map(|i| {
                let k = if self.top_down { n - 1 - i } else { i };
                (a * n as f64 - k as f64).clamp(0.0, 1.0)
            })
            .collect()
    }
}

impl LossTerm for Layerwise {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let w = self.pair_weights(ctx.progress);
        let d = self.inner.pair_distances(ctx)?;
        let mut total = d[0].zeros_like()?;
        for (dk, wk) in d.iter().zip(&w) {
            total = (total + (dk * *wk)?)?;
        }
        Ok((total / w.iter().sum::<f64>().max(1.0))?)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn student_taps(&self) -> Vec<String> {
        self.inner.student_taps()
    }
    fn teacher_taps(&self) -> Vec<String> {
        self.inner.teacher_taps()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.inner.vars()
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        let mut v = vec![("frontier".to_string(), self.frontier.at(progress))];
        v.extend(
            self.pair_weights(progress)
                .into_iter()
                .enumerate()
                .map(|(k, w)| (format!("pair{k}.weight"), w)),
        );
        v
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: LayerwiseParams = params.parse()?;
    let distance = match p.distance.as_str() {
        "mse" => Distance::Mse,
        "cosine" => Distance::Cosine,
        other => return Err(params.error("distance", format!("expected \"mse\" or \"cosine\", got \"{other}\""))),
    };
    let top_down = match p.order.as_str() {
        "bottom_up" => false,
        "top_down" => true,
        other => {
            return Err(params.error(
                "order",
                format!("expected \"bottom_up\" or \"top_down\", got \"{other}\""),
            ))
        }
    };
    let mut pair_params = params.values().clone();
    for k in ["distance", "order", "frontier"] {
        pair_params.remove(k);
    }
    let inner = HiddenMatch::from_params(distance, &Params::new(params.path(), pair_params), ctx)?;
    Ok(Box::new(Layerwise {
        inner,
        frontier: p.frontier.build_in(&params.key_path("frontier"), ctx, 0.0, 1.0)?,
        top_down,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "layerwise",
        description: "progressive hidden-state matching: layer pairs switch on as a frontier schedule advances",
        build, params: retort_core::registry::params_schema::<LayerwiseParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use retort_core::{ModelInfo, Registry};

    #[test]
    fn pairs_switch_on_in_order() {
        let mut reg = Registry::empty();
        for f in inventory::iter::<Factory<dyn retort_core::Schedule>> {
            reg.schedules.register(f, "built-in").expect("register");
        }
        let mut ctx = BuildContext::new(&reg, Device::Cpu, 0);
        let info = |layers| ModelInfo {
            layers,
            hidden: 4,
            heads: 1,
            vocab: 5,
            context: 4,
            dtype: DType::F32,
        };
        ctx.student = Some(info(2));
        ctx.teacher = Some(info(4));
        let p = Params::new(
            "loss[1]",
            serde_json::json!({"map": "uniform"}).as_object().expect("o").clone(),
        );
        let term = build(&p, &ctx).expect("build");
        // Two pairs, frontier linear 0 -> 1: a = 0.25 -> [0.5, 0]; a = 0.75 -> [1, 0.5].
        let weights = |step| {
            term.scalars(Progress::new(step, 100))
                .into_iter()
                .skip(1)
                .map(|(_, w)| w)
                .collect::<Vec<f64>>()
        };
        assert_eq!(weights(25), vec![0.5, 0.0]);
        assert_eq!(weights(75), vec![1.0, 0.5]);
        assert_eq!(term.student_taps(), vec!["hidden.1", "hidden.2"]);
        let bad = Params::new(
            "loss[1]",
            serde_json::json!({"order": "sideways"}).as_object().expect("o").clone(),
        );
        assert!(build(&bad, &ctx)
            .err()
            .expect("fail")
            .to_string()
            .contains("loss[1].order"));
    }
}
