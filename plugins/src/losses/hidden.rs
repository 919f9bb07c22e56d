//! `hidden_mse` and `hidden_cosine`: matching student hidden states to teacher hidden states.
//!
//! For each layer pair `(s, t)` (student tap `hidden.s`, teacher tap `hidden.t`) and each
//! counted token, with `h_s` the student state mapped to the teacher width by a learned linear
//! projection `P(h) = h W + b` when the widths differ (identity otherwise):
//! - `hidden_mse` (FitNets, Romero et al. 2015; TinyBERT, Jiao et al. 2020):
//!   `L = mean_pairs mean_tokens mean_d (P(h_s) - h_t)^2`.
//! - `hidden_cosine` (DistilBERT, Sanh et al. 2019):
//!   `L = mean_pairs mean_tokens (1 - cos(P(h_s), h_t))`.
//!
//! Pairs: `layers = [[s, t], ...]`, or `map = "uniform"`: student block outputs `s = 1..=L_s`
//! matched to `t = round(s * L_t / L_s)` (the last student layer to the last teacher layer).
//! Projections are trained with the student and are not part of the exported student.
//!
//! ```toml
//! [[loss]]
//! kind = "hidden_mse"
//! weight = 0.1
//! map = "uniform"          # or layers = [[1, 2], [2, 4]]
//! ```

use candle_core::{Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, LossTerm, ModelInfo, Params, Result, StepContext};

use super::masked_mean;

/// Params of the hidden-state terms.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HiddenParams {
    /// Explicit `[student, teacher]` hidden-tap index pairs.
    pub layers: Option<Vec<[usize; 2]>>,
    /// `"uniform"`: one pair per student block, spread evenly over the teacher.
    pub map: Option<String>,
}

/// Which distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distance {
    /// Mean squared error.
    Mse,
    /// One minus cosine similarity.
    Cosine,
}

struct Pair {
    student: usize,
    teacher: usize,
    projection: Option<(Var, Var)>,
}

/// Hidden-state matching term.
pub struct HiddenMatch {
    distance: Distance,
    pairs: Vec<Pair>,
}

/// The uniform map: student block `s` (1-based) to teacher block `round(s * L_t / L_s)`.
pub fn uniform_pairs(student_layers: usize, teacher_layers: usize) -> Vec<[usize; 2]> {
    (1..=student_layers)
        .map(|s| {
            [
                s,
                ((s * teacher_layers) as f64 / student_layers as f64).round() as usize,
            ]
        })
        .collect()
}

pub(crate) fn resolve_pairs(
    params: &Params,
    p: &HiddenParams,
    s: &ModelInfo,
    t: &ModelInfo,
) -> Result<Vec<[usize; 2]>> {
    let pairs = match (&p.layers, p.map.as_deref()) {
        (Some(_), Some(_)) => return Err(params.error("map", "give either `layers` or `map`, not both")),
        (Some(l), None) => l.clone(),
        (None, Some("uniform")) | (None, None) => uniform_pairs(s.layers, t.layers),
        (None, Some(other)) => return Err(params.error("map", format!("expected \"uniform\", got \"{other}\""))),
    };
    if pairs.is_empty() {
        return Err(params.error("layers", "expected at least one [student, teacher] pair"));
    }
    for (i, [a, b]) in pairs.iter().enumerate() {
        if *a > s.layers || *b > t.layers {
            return Err(params.error(
                &format!("layers[{i}]"),
                format!(
                    "[{a}, {b}] is out of range: the student has hidden.0..=hidden.{}, the teacher hidden.0..=hidden.{}",
                    s.layers, t.layers
                ),
            ));
        }
    }
    Ok(pairs)
}

impl HiddenMatch {
    fn build(distance: Distance, params: &Params, ctx: &BuildContext) -> Result<Self> {
        let p: HiddenParams = params.parse()?;
        let (s, t) = ctx.require_models(params.path())?;
        let pairs = resolve_pairs(params, &p, &s, &t)?;
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed ^ 0x41dd_e000);
        let pairs = pairs
            .into_iter()
            .map(|[a, b]| {
                let projection = if s.hidden != t.hidden {
                    Some(projection(s.hidden, t.hidden, s.dtype, &mut rng, ctx)?)
                } else {
                    None
                };
                Ok(Pair {
                    student: a,
                    teacher: b,
                    projection,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HiddenMatch { distance, pairs })
    }
}

/// A trainable linear map `[d_in, d_out]` (+ bias), weights `N(0, 1/d_in)`, bias 0.
pub(crate) fn projection(
    d_in: usize,
    d_out: usize,
    dtype: candle_core::DType,
    rng: &mut ChaCha8Rng,
    ctx: &BuildContext,
) -> Result<(Var, Var)> {
    let std = (1.0 / d_in as f64).sqrt() as f32;
    let normal = Normal::new(0.0f32, std).map_err(|e| Error::failed("projection init", e))?;
    let w: Vec<f32> = (0..d_in * d_out).map(|_| normal.sample(rng)).collect();
    let w = Tensor::from_vec(w, (d_in, d_out), &ctx.device)?.to_dtype(dtype)?;
    let b = Tensor::zeros(d_out, dtype, &ctx.device)?;
    Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?))
}

/// Per-token distance between `hs` and `ht`, `[b, s, d] -> [b, s]`.
pub fn per_token(distance: Distance, hs: &Tensor, ht: &Tensor) -> Result<Tensor> {
    Ok(match distance {
        Distance::Mse => (hs - ht)?.sqr()?.mean(D::Minus1)?,
        Distance::Cosine => {
            let dot = (hs * ht)?.sum(D::Minus1)?;
            let ns = hs.sqr()?.sum(D::Minus1)?.sqrt()?;
            let nt = ht.sqr()?.sum(D::Minus1)?.sqrt()?;
            let cos = (dot / ((ns * nt)? + 1e-8)?)?;
            cos.affine(-1.0, 1.0)?
        }
    })
}

impl HiddenMatch {
    /// Builds the term from params (shared with `layerwise`).
    pub fn from_params(distance: Distance, params: &Params, ctx: &BuildContext) -> Result<Self> {
        Self::build(distance, params, ctx)
    }

    /// Number of layer pairs.
    pub fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// The distance of every pair, each a scalar averaged over counted tokens.
    pub fn pair_distances(&self, ctx: &StepContext) -> Result<Vec<Tensor>> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("hidden-state terms need teacher outputs".into()))?;
        self.pairs
            .iter()
            .map(|pair| {
                let hs = ctx.student.tap(&format!("hidden.{}", pair.student))?;
                let ht = teacher.tap(&format!("hidden.{}", pair.teacher))?.to_dtype(hs.dtype())?;
                let hs = match &pair.projection {
                    Some((w, b)) => crate::models::nn::linear(hs, w.as_tensor(), b.as_tensor())?,
                    None => hs.clone(),
                };
                Ok(masked_mean(
                    &per_token(self.distance, &hs, &ht)?,
                    ctx.batch.mask.as_ref(),
                )?)
            })
            .collect()
    }
}

impl LossTerm for HiddenMatch {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let d = self.pair_distances(ctx)?;
        let n = d.len() as f64;
        Ok((Tensor::stack(&d, 0)?.sum_all()? / n)?)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn student_taps(&self) -> Vec<String> {
        self.pairs.iter().map(|p| format!("hidden.{}", p.student)).collect()
    }
    fn teacher_taps(&self) -> Vec<String> {
        self.pairs.iter().map(|p| format!("hidden.{}", p.teacher)).collect()
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.pairs
            .iter()
            .filter_map(|p| {
                p.projection.as_ref().map(|(w, b)| {
                    let n = format!("proj.{}_{}", p.student, p.teacher);
                    [(format!("{n}.weight"), w.clone()), (format!("{n}.bias"), b.clone())]
                })
            })
            .flatten()
            .collect()
    }
}

fn build_mse(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(HiddenMatch::build(Distance::Mse, params, ctx)?))
}
fn build_cosine(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    Ok(Box::new(HiddenMatch::build(Distance::Cosine, params, ctx)?))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "hidden_mse",
        description: "MSE between (projected) student and teacher hidden states per layer pair (FitNets/TinyBERT)",
        build: build_mse, params: retort_core::registry::params_schema::<HiddenParams> }
}
inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "hidden_cosine",
        description: "1 - cosine between (projected) student and teacher hidden states per layer pair (DistilBERT)",
        build: build_cosine, params: retort_core::registry::params_schema::<HiddenParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use retort_core::{Batch, Outputs, Progress, Registry};
    use std::collections::BTreeMap;

    fn info(layers: usize, hidden: usize) -> ModelInfo {
        ModelInfo {
            layers,
            hidden,
            heads: 2,
            vocab: 5,
            context: 8,
            dtype: DType::F64,
        }
    }

    fn term(kind: Distance, params: serde_json::Value, s: ModelInfo, t: ModelInfo) -> Result<HiddenMatch> {
        let r = Registry::empty();
        let mut ctx = BuildContext::new(&r, Device::Cpu, 3);
        ctx.student = Some(s);
        ctx.teacher = Some(t);
        HiddenMatch::build(
            kind,
            &Params::new("loss[1]", params.as_object().expect("o").clone()),
            &ctx,
        )
    }

    fn value(term: &HiddenMatch, hs: &Tensor, ht: &Tensor) -> Tensor {
        let ids = Tensor::zeros((1, 2), DType::U32, &Device::Cpu).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let logits = Tensor::zeros((1, 2, 5), DType::F64, &Device::Cpu).expect("l");
        let s = Outputs {
            logits: logits.clone(),
            taps: BTreeMap::from([("hidden.1".to_string(), hs.clone())]),
        };
        let t = Outputs {
            logits,
            taps: BTreeMap::from([("hidden.2".to_string(), ht.clone())]),
        };
        term.compute(&StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&t),
            progress: Progress::new(0, 1),
            token_weights: None,
        })
        .expect("compute")
    }

    const HS: [[[f64; 3]; 2]; 1] = [[[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]]];
    const HT: [[[f64; 3]; 2]; 1] = [[[0.0, 2.0, 1.0], [1.0, -1.0, 2.0]]];

    #[test]
    fn mse_and_cosine_match_reference_values_without_projection() {
        let hs = Tensor::new(&HS, &Device::Cpu).expect("hs");
        let ht = Tensor::new(&HT, &Device::Cpu).expect("ht");
        // Reference: mean over 2 tokens of mean_d (a - b)^2, and of 1 - a.b / (|a||b|).
        let (a, b) = (HS[0], HT[0]);
        let mse = (0..2)
            .map(|i| (0..3).map(|d| (a[i][d] - b[i][d]).powi(2)).sum::<f64>() / 3.0)
            .sum::<f64>()
            / 2.0;
        let cos = (0..2)
            .map(|i| {
                let dot: f64 = (0..3).map(|d| a[i][d] * b[i][d]).sum();
                let n = |v: &[f64; 3]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                1.0 - dot / (n(&a[i]) * n(&b[i]))
            })
            .sum::<f64>()
            / 2.0;
        let p = serde_json::json!({"layers": [[1, 2]]});
        let t = term(Distance::Mse, p.clone(), info(2, 3), info(4, 3)).expect("mse");
        assert!(t.vars().is_empty(), "equal widths need no projection");
        assert!((value(&t, &hs, &ht).to_scalar::<f64>().expect("s") - mse).abs() < 1e-12);
        let t = term(Distance::Cosine, p, info(2, 3), info(4, 3)).expect("cos");
        assert!((value(&t, &hs, &ht).to_scalar::<f64>().expect("s") - cos).abs() < 1e-8);
    }

    #[test]
    fn projection_is_trainable_and_gradients_match_finite_differences() {
        // Student width 3, teacher width 2: a [3, 2] projection.
        let t = term(
            Distance::Mse,
            serde_json::json!({"layers": [[1, 2]]}),
            info(2, 3),
            info(4, 2),
        )
        .expect("t");
        let vars = t.vars();
        assert_eq!(vars.len(), 2);
        assert_eq!(vars[0].0, "proj.1_2.weight");
        let hs = Var::new(&HS, &Device::Cpu).expect("hs");
        let ht = Tensor::new(&[[[0.5, -1.0], [2.0, 0.0]]], &Device::Cpu).expect("ht");
        let grads = value(&t, hs.as_tensor(), &ht).backward().expect("bwd");
        let w = &vars[0].1;
        for (var, dims) in [(&hs, (1usize, 2usize, 3usize)), (w, (3, 2, 1))] {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .expect("grad")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            let base: Vec<f64> = var.as_tensor().flatten_all().expect("f").to_vec1().expect("v");
            for i in 0..base.len() {
                let f = |d: f64| {
                    let mut x = base.clone();
                    x[i] += d;
                    var.set(&Tensor::from_vec(x, var.shape(), &Device::Cpu).expect("t"))
                        .expect("set");
                    let v = value(&t, hs.as_tensor(), &ht).to_scalar::<f64>().expect("s");
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).expect("t"))
                        .expect("set");
                    v
                };
                let num = (f(1e-6) - f(-1e-6)) / 2e-6;
                assert!((num - g[i]).abs() < 1e-6, "{dims:?}[{i}]: {num} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn uniform_map_and_range_errors() {
        assert_eq!(uniform_pairs(2, 4), vec![[1, 2], [2, 4]]);
        assert_eq!(uniform_pairs(3, 4), vec![[1, 1], [2, 3], [3, 4]]);
        let err = term(
            Distance::Mse,
            serde_json::json!({"layers": [[1, 2], [3, 1]]}),
            info(2, 3),
            info(4, 3),
        )
        .err()
        .expect("must fail");
        assert!(err.to_string().contains("loss[1].layers[1]"), "{err}");
        let err = term(
            Distance::Mse,
            serde_json::json!({"map": "diagonal"}),
            info(2, 3),
            info(4, 3),
        )
        .err()
        .expect("fail");
        assert!(err.to_string().contains("loss[1].map"), "{err}");
    }
}
