//! `contrastive`: InfoNCE between pooled student and teacher representations across the batch
//! (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding";
//! for distillation: CRD, Tian et al. 2020, "Contrastive Representation Distillation").
//!
//! Each window `i` is pooled (mean over its counted tokens) from the student tap
//! `hidden.{student_layer}` and the teacher tap `hidden.{teacher_layer}`, mapped by a projection
//! head to `dim` (a learned linear map on a side whose width differs from `dim`), and
//! L2-normalised to `z_s[i]`, `z_t[i]`. With `S[i, j] = z_s[i] . z_t[j] / tau`:
//! `L = mean_i -log softmax_j(S[i, :])[i]` — the student's window must pick out its own
//! teacher window among the batch's. `symmetric = true` averages with the teacher-to-student
//! direction `mean_j -log softmax_i(S[:, j])[j]`. Needs batches of at least 2 windows.
//!
//! ```toml
//! [[loss]]
//! kind = "contrastive"
//! weight = 0.05
//! temperature = 0.1
//! ```

use candle_core::{Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{ops, BuildContext, Error, LossTerm, Params, Progress, Result, Scalar, ScalarSpec, StepContext};

use super::hidden::projection;
use crate::models::nn::linear;

/// Params of `contrastive`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContrastiveParams {
    /// Student hidden tap index. Default: the last (`hidden.{L_s}`).
    pub student_layer: Option<usize>,
    /// Teacher hidden tap index. Default: the last.
    pub teacher_layer: Option<usize>,
    /// Embedding width. Default: the teacher's hidden width.
    pub dim: Option<usize>,
    /// InfoNCE temperature `tau` in [0.001, 1000]: a number or a schedule. Default 0.1.
    #[serde(default = "d_tau")]
    pub temperature: ScalarSpec,
    /// Average both directions. Default false.
    #[serde(default)]
    pub symmetric: bool,
}

fn d_tau() -> ScalarSpec {
    ScalarSpec::Number(0.1)
}

/// InfoNCE term.
pub struct Contrastive {
    student_layer: usize,
    teacher_layer: usize,
    student_head: Option<(Var, Var)>,
    teacher_head: Option<(Var, Var)>,
    temperature: Scalar,
    symmetric: bool,
}

fn pool(h: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        None => h.mean(1)?,
        Some(m) => {
            let m = m.to_dtype(h.dtype())?.unsqueeze(2)?;
            let count = m.sum(1)?.maximum(1.0)?;
            h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&count)?
        }
    })
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let n = (x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-8)?;
    Ok(x.broadcast_div(&n)?)
}

/// InfoNCE of embeddings `zs`, `zt` (`[n, d]`, normalised) at temperature `tau`.
pub fn info_nce(zs: &Tensor, zt: &Tensor, tau: f64, symmetric: bool) -> Result<Tensor> {
    let n = zs.dim(0)?;
    let sim = (zs.matmul(&zt.t()?)? / tau)?;
    let eye = Tensor::eye(n, sim.dtype(), sim.device())?;
    let row = (ops::log_softmax(&sim)? * &eye)?.sum_all()?.neg()?;
    let loss = if symmetric {
        let col = (ops::log_softmax(&sim.t()?)? * &eye)?.sum_all()?.neg()?;
        ((row + col)? * 0.5)?
    } else {
        row
    };
    Ok((loss / n as f64)?)
}

impl LossTerm for Contrastive {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("contrastive needs teacher outputs".into()))?;
        let hs = ctx.student.tap(&format!("hidden.{}", self.student_layer))?;
        let ht = teacher
            .tap(&format!("hidden.{}", self.teacher_layer))?
            .to_dtype(hs.dtype())?;
        let mask = ctx.batch.mask.as_ref();
        let head = |x: Tensor, h: &Option<(Var, Var)>| -> Result<Tensor> {
            Ok(match h {
                Some((w, b)) => linear(&x, w.as_tensor(), b.as_tensor())?,
                None => x,
            })
        };
        let zs = normalize(&head(pool(hs, mask)?, &self.student_head)?)?;
        let zt = normalize(&head(pool(&ht, mask)?, &self.teacher_head)?)?;
        info_nce(&zs, &zt, self.temperature.at(ctx.progress), self.symmetric)
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn student_taps(&self) -> Vec<String> {
        vec![format!("hidden.{}", self.student_layer)]
    }
    fn teacher_taps(&self) -> Vec<String> {
        vec![format!("hidden.{}", self.teacher_layer)]
    }
    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (side, h) in [
            ("student_head", &self.student_head),
            ("teacher_head", &self.teacher_head),
        ] {
            if let Some((w, b)) = h {
                v.push((format!("{side}.weight"), w.clone()));
                v.push((format!("{side}.bias"), b.clone()));
            }
        }
        v
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        vec![("temperature".into(), self.temperature.at(progress))]
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: ContrastiveParams = params.parse()?;
    let (s, t) = ctx.require_models(params.path())?;
    let student_layer = p.student_layer.unwrap_or(s.layers);
    let teacher_layer = p.teacher_layer.unwrap_or(t.layers);
    if student_layer > s.layers {
        return Err(params.error(
            "student_layer",
            format!("the student has hidden.0..=hidden.{}", s.layers),
        ));
    }
    if teacher_layer > t.layers {
        return Err(params.error(
            "teacher_layer",
            format!("the teacher has hidden.0..=hidden.{}", t.layers),
        ));
    }
    let dim = p.dim.unwrap_or(t.hidden);
    if dim == 0 {
        return Err(params.error("dim", "expected an integer >= 1, got 0"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed ^ 0xc0_47a5);
    let student_head = if s.hidden != dim {
        Some(projection(s.hidden, dim, s.dtype, &mut rng, ctx)?)
    } else {
        None
    };
    let teacher_head = if t.hidden != dim {
        Some(projection(t.hidden, dim, s.dtype, &mut rng, ctx)?)
    } else {
        None
    };
    Ok(Box::new(Contrastive {
        student_layer,
        teacher_layer,
        student_head,
        teacher_head,
        temperature: p.temperature.build_temperature(&params.key_path("temperature"), ctx)?,
        symmetric: p.symmetric,
    }))
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "contrastive",
        description: "InfoNCE between pooled student and teacher representations across the batch (CRD)",
        build, params: retort_core::registry::params_schema::<ContrastiveParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_reference_values() {
        // Two unit vectors per side; reference: mean_i -log(exp(S_ii) / sum_j exp(S_ij)).
        let zs = [[1.0f64, 0.0], [0.6, 0.8]];
        let zt = [[0.8f64, 0.6], [0.0, 1.0]];
        let tau = 0.5;
        let s = |i: usize, j: usize| (zs[i][0] * zt[j][0] + zs[i][1] * zt[j][1]) / tau;
        let row = |i: usize| -(s(i, i).exp() / (s(i, 0).exp() + s(i, 1).exp())).ln();
        let col = |j: usize| -(s(j, j).exp() / (s(0, j).exp() + s(1, j).exp())).ln();
        let want = (row(0) + row(1)) / 2.0;
        let want_sym = 0.5 * (want + (col(0) + col(1)) / 2.0);
        let a = Tensor::new(&zs, &Device::Cpu).expect("a");
        let b = Tensor::new(&zt, &Device::Cpu).expect("b");
        let got = info_nce(&a, &b, tau, false)
            .expect("nce")
            .to_scalar::<f64>()
            .expect("s");
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let got = info_nce(&a, &b, tau, true).expect("nce").to_scalar::<f64>().expect("s");
        assert!((got - want_sym).abs() < 1e-12, "{got} vs {want_sym}");
    }

    #[test]
    fn gradient_matches_finite_difference_through_pooling_and_normalisation() {
        let h0 = Tensor::new(&[[[1.0f64, 0.5], [0.2, -1.0]], [[0.3, 0.3], [-0.5, 2.0]]], &Device::Cpu).expect("h");
        let ht = Tensor::new(&[[[0.5f64, 1.0], [1.0, 0.0]], [[-1.0, 0.2], [0.4, 0.4]]], &Device::Cpu).expect("t");
        let f = |h: &Tensor| {
            let zs = normalize(&pool(h, None).expect("p")).expect("n");
            let zt = normalize(&pool(&ht, None).expect("p")).expect("n");
            info_nce(&zs, &zt, 0.3, true).expect("nce")
        };
        let v = Var::from_tensor(&h0).expect("v");
        let g = f(v.as_tensor()).backward().expect("bwd");
        let g: Vec<f64> = g
            .get(v.as_tensor())
            .expect("g")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        let base: Vec<f64> = h0.flatten_all().expect("f").to_vec1().expect("v");
        for i in 0..base.len() {
            let val = |d: f64| {
                let mut w = base.clone();
                w[i] += d;
                f(&Tensor::from_vec(w, (2, 2, 2), &Device::Cpu).expect("t"))
                    .to_scalar::<f64>()
                    .expect("s")
            };
            let num = (val(1e-6) - val(-1e-6)) / 2e-6;
            assert!((num - g[i]).abs() < 1e-6, "[{i}]: {num} vs {}", g[i]);
        }
    }
}
