//! `attention`: attention-map transfer from teacher to student.
//!
//! For each layer pair `(s, t)` (taps `attn.s`, `attn.t`: probabilities `[b, heads, q, k]`),
//! heads are matched first: `heads = "average"` compares the head-averaged maps;
//! `heads = "match"` compares head `i` of the student with head `i` of the teacher, or, when the
//! teacher has `g` times as many heads, with the average of teacher heads `g*i .. g*i+g`.
//! Each query row is then compared:
//!
//! - `loss = "kl"` (MiniLM, Wang et al. 2020): `sum_k a_t log((a_t + eps) / (a_s + eps))`;
//! - `loss = "mse"` (TinyBERT, Jiao et al. 2020): `mean_k (a_s - a_t)^2`.
//!
//! `L = mean_pairs mean_tokens mean_heads row_loss` (tokens = counted query positions).
//!
//! Pairs: `layers = [[s, t], ...]` (0-based blocks), or `map = "last"` (default: last student
//! block to last teacher block), or `map = "uniform"` (`s -> round((s + 1) L_t / L_s) - 1`).
//!
//! ```toml
//! [[loss]]
//! kind = "attention"
//! weight = 0.1
//! map = "last"
//! heads = "average"
//! loss = "kl"
//! ```

use candle_core::{Tensor, D};
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, LossTerm, Params, Result, StepContext};

use super::masked_mean;

/// Params of `attention`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AttentionParams {
    /// Explicit `[student block, teacher block]` pairs.
    pub layers: Option<Vec<[usize; 2]>>,
    /// `"last"` (default) or `"uniform"`.
    pub map: Option<String>,
    /// `"average"` (default) or `"match"`.
    #[serde(default = "d_heads")]
    pub heads: String,
    /// `"kl"` (default) or `"mse"`.
    #[serde(default = "d_loss")]
    pub loss: String,
}

fn d_heads() -> String {
    "average".into()
}
fn d_loss() -> String {
    "kl".into()
}

/// How heads are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadMatch {
    /// Compare head-averaged maps.
    Average,
    /// Head `i` with teacher group `i` (group size `g`).
    Match {
        /// Teacher heads per student head.
        group: usize,
    },
}

/// Row distance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowLoss {
    /// KL(teacher row || student row).
    Kl,
    /// Mean squared error over the row.
    Mse,
}

/// Attention transfer term.
pub struct AttentionTransfer {
    pairs: Vec<[usize; 2]>,
    heads: HeadMatch,
    loss: RowLoss,
}

const EPS: f64 = 1e-12;

/// Per-query loss `[b, q]` between attention maps `[b, h, q, k]` after head matching.
pub fn per_query(student: &Tensor, teacher: &Tensor, heads: HeadMatch, loss: RowLoss) -> Result<Tensor> {
    let teacher = teacher.to_dtype(student.dtype())?;
    let (s, t) = match heads {
        HeadMatch::Average => (student.mean_keepdim(1)?, teacher.mean_keepdim(1)?),
        HeadMatch::Match { group } => {
            let (b, h, q, k) = teacher.dims4()?;
            let t = if group == 1 {
                teacher
            } else {
                teacher.reshape((b, h / group, group, q, k))?.mean(2)?
            };
            (student.clone(), t)
        }
    };
    let row = match loss {
        RowLoss::Kl => (&t * ((&t + EPS)?.log()? - (&s + EPS)?.log()?)?)?.sum(D::Minus1)?,
        RowLoss::Mse => (&s - &t)?.sqr()?.mean(D::Minus1)?,
    };
    Ok(row.mean(1)?)
}

impl LossTerm for AttentionTransfer {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("attention transfer needs teacher outputs".into()))?;
        let mut total: Option<Tensor> = None;
        for [s, t] in &self.pairs {
            let a_s = ctx.student.tap(&format!("attn.{s}"))?;
            let a_t = teacher.tap(&format!("attn.{t}"))?;
            let v = masked_mean(&per_query(a_s, a_t, self.heads, self.loss)?, ctx.batch.mask.as_ref())?;
            total = Some(match total {
                Some(x) => (x + v)?,
                None => v,
            });
        }
        let total = total.ok_or_else(|| Error::Runtime("no layer pairs".into()))?;
        Ok((total / self.pairs.len() as f64)?)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn student_taps(&self) -> Vec<String> {
        self.pairs.iter().map(|[s, _]| format!("attn.{s}")).collect()
    }
    fn teacher_taps(&self) -> Vec<String> {
        self.pairs.iter().map(|[_, t]| format!("attn.{t}")).collect()
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: AttentionParams = params.parse()?;
    let (s, t) = ctx.require_models(params.path())?;
    let pairs: Vec<[usize; 2]> = match (&p.layers, p.map.as_deref()) {
        (Some(_), Some(_)) => return Err(params.error("map", "give either `layers` or `map`, not both")),
        (Some(l), None) => l.clone(),
        (None, None) | (None, Some("last")) => vec![[s.layers - 1, t.layers - 1]],
        (None, Some("uniform")) => (0..s.layers)
            .map(|i| [i, (((i + 1) * t.layers) as f64 / s.layers as f64).round() as usize - 1])
            .collect(),
        (None, Some(other)) => {
            return Err(params.error("map", format!("expected \"last\" or \"uniform\", got \"{other}\"")))
        }
    };
    if pairs.is_empty() {
        return Err(params.error("layers", "expected at least one [student, teacher] pair"));
    }
    for (i, [a, b]) in pairs.iter().enumerate() {
        if *a >= s.layers || *b >= t.layers {
            return Err(params.error(
                &format!("layers[{i}]"),
                format!(
                    "[{a}, {b}] is out of range: the student has blocks 0..{}, the teacher 0..{}",
                    s.layers, t.layers
                ),
            ));
        }
    }
    let heads = match p.heads.as_str() {
        "average" => HeadMatch::Average,
        "match" if t.heads % s.heads == 0 => HeadMatch::Match {
            group: t.heads / s.heads,
        },
        "match" => {
            return Err(params.error(
                "heads",
                format!(
                    "\"match\" needs the teacher's heads ({}) to be a multiple of the student's ({})",
                    t.heads, s.heads
                ),
            ))
        }
        other => return Err(params.error("heads", format!("expected \"average\" or \"match\", got \"{other}\""))),
    };
    let loss = match p.loss.as_str() {
        "kl" => RowLoss::Kl,
        "mse" => RowLoss::Mse,
        other => return Err(params.error("loss", format!("expected \"kl\" or \"mse\", got \"{other}\""))),
    };
    Ok(Box::new(AttentionTransfer { pairs, heads, loss }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "attention",
        description: "attention-map transfer, KL or MSE per query row, heads averaged or matched (MiniLM/TinyBERT)",
        build, params: retort_core::registry::params_schema::<AttentionParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use retort_core::{ModelInfo, Registry};

    // One batch, student 1 head, teacher 2 heads, 2 queries x 2 keys (causal rows).
    const AS: [[[[f64; 2]; 2]; 1]; 1] = [[[[1.0, 0.0], [0.3, 0.7]]]];
    const AT: [[[[f64; 2]; 2]; 2]; 1] = [[[[1.0, 0.0], [0.6, 0.4]], [[1.0, 0.0], [0.2, 0.8]]]];

    fn tensors() -> (Tensor, Tensor) {
        (
            Tensor::new(&AS, &Device::Cpu).expect("s"),
            Tensor::new(&AT, &Device::Cpu).expect("t"),
        )
    }

    #[test]
    fn kl_and_mse_match_reference_values() {
        let (s, t) = tensors();
        // Matched with group 2: teacher rows averaged -> row 0 [1, 0], row 1 [0.4, 0.6].
        // Reference KL row 1: 0.4 ln(0.4/0.3) + 0.6 ln(0.6/0.7); row 0: 0. Mean over 2 queries.
        let kl_row1 = 0.4 * (0.4f64 / 0.3).ln() + 0.6 * (0.6f64 / 0.7).ln();
        let got = per_query(&s, &t, HeadMatch::Match { group: 2 }, RowLoss::Kl).expect("kl");
        let v: Vec<Vec<f64>> = got.to_vec2().expect("v");
        assert!(v[0][0].abs() < 1e-10 && (v[0][1] - kl_row1).abs() < 1e-10, "{v:?}");
        // Averaging gives the same teacher map here (1 student head); MSE row 1: mean of
        // (0.3 - 0.4)^2 and (0.7 - 0.6)^2 = 0.01.
        let got = per_query(&s, &t, HeadMatch::Average, RowLoss::Mse).expect("mse");
        assert!((got.to_vec2::<f64>().expect("v")[0][1] - 0.01).abs() < 1e-12);
    }

    #[test]
    fn gradient_matches_finite_difference() {
        let (s0, t) = tensors();
        let s = Var::from_tensor(&s0).expect("var");
        for loss in [RowLoss::Kl, RowLoss::Mse] {
            let f = |x: &Tensor| {
                per_query(x, &t, HeadMatch::Average, loss)
                    .expect("q")
                    .sum_all()
                    .expect("s")
            };
            let g = f(s.as_tensor()).backward().expect("bwd");
            let g: Vec<f64> = g
                .get(s.as_tensor())
                .expect("g")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            let base: Vec<f64> = s0.flatten_all().expect("f").to_vec1().expect("v");
            for i in [2usize, 3] {
                let val = |d: f64| {
                    let mut w = base.clone();
                    w[i] += d;
                    f(&Tensor::from_vec(w, (1, 1, 2, 2), &Device::Cpu).expect("t"))
                        .to_scalar::<f64>()
                        .expect("s")
                };
                let num = (val(1e-7) - val(-1e-7)) / 2e-7;
                assert!((num - g[i]).abs() < 1e-5, "{loss:?}[{i}]: {num} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn head_matching_is_validated() {
        let r = Registry::empty();
        let mut ctx = BuildContext::new(&r, Device::Cpu, 0);
        let info = |heads| ModelInfo {
            layers: 2,
            hidden: 8,
            heads,
            vocab: 5,
            context: 4,
            dtype: DType::F32,
        };
        ctx.student = Some(info(2));
        ctx.teacher = Some(info(3));
        let p = Params::new(
            "loss[2]",
            serde_json::json!({"heads": "match"}).as_object().expect("o").clone(),
        );
        let err = build(&p, &ctx).err().expect("must fail");
        assert!(err.to_string().contains("loss[2].heads"), "{err}");
        let p = Params::new(
            "loss[2]",
            serde_json::json!({"layers": [[2, 0]]}).as_object().expect("o").clone(),
        );
        assert!(build(&p, &ctx)
            .err()
            .expect("fail")
            .to_string()
            .contains("loss[2].layers[0]"));
    }
}
