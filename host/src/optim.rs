//! AdamW (Loshchilov & Hutter, 2019) with global-norm gradient clipping.
//!
//! For each parameter `w` with gradient `g` at step `t`:
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `w = w (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//! Weight decay applies to matrices only: not to biases, norms or embeddings.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use retort_core::{Error, Result};

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm clip; 0 disables.
    pub grad_clip: f64,
}

struct ParamState {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over named parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    t: i32,
}

/// Whether a parameter gets weight decay: matrices that are not embeddings.
pub fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !(name.contains("wte") || name.contains("wpe") || name.contains("embed"))
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// An optimizer over `vars` with zeroed moments.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let z = var.as_tensor().zeros_like()?;
                Ok(ParamState {
                    decay: decays(&name, var.rank()),
                    m: z.clone(),
                    v: z,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, t: 0 })
    }

    /// One update at learning rate `lr`. A parameter without a gradient is an error: it means
    /// the graph does not reach it (a non-differentiable op on the path).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let mut gs = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = grads.get(p.var.as_tensor()).ok_or_else(|| {
                Error::Runtime(format!(
                    "parameter `{}` received no gradient (is a non-differentiable op on its path?)",
                    p.name
                ))
            })?;
            // Detached: a gradient computed from tracked tensors carries the step's graph, and
            // the moments would keep every step's graph alive (a leak of ~60 MB a step).
            gs.push(g.detach());
        }
        let sq: Vec<Tensor> = gs
            .iter()
            .map(|g| g.to_dtype(DType::F64)?.sqr()?.sum_all())
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Runtime(format!("non-finite gradient norm {grad_norm}")));
        }
        let scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        for (p, g) in self.params.iter_mut().zip(gs) {
            let g = if scale != 1.0 { (g * scale)? } else { g };
            p.m = ((&p.m * b1)? + (&g * (1.0 - b1))?)?;
            p.v = ((&p.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((&p.v / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((&p.m / bc1)? / denom)?;
            let w = p.var.as_tensor();
            let decayed = if p.decay && self.cfg.weight_decay > 0.0 {
                (w * (1.0 - lr * self.cfg.weight_decay))?
            } else {
                w.clone()
            };
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(StepStats { grad_norm })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_matches_reference_update() {
        // Reference: at t = 1, m/(1-b1) = g and v/(1-b2) = g^2, so the update is
        // lr * g / (|g| + eps) = lr * sign(g), plus decay w * lr * wd for matrices.
        let w = Var::new(&[[1.0f64, -2.0], [0.5, 0.0]], &Device::Cpu).expect("w");
        let b = Var::new(&[1.0f64, 1.0], &Device::Cpu).expect("b");
        let loss = ((w.as_tensor().sum_all().expect("s") * 3.0).expect("m") - b.as_tensor().sum_all().expect("s"))
            .expect("sub");
        let grads = loss.backward().expect("bwd");
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: 0.1,
            grad_clip: 0.0,
        };
        let mut opt = AdamW::new(
            vec![
                ("h.0.mlp.c_fc.weight".into(), w.clone()),
                ("h.0.mlp.c_fc.bias".into(), b.clone()),
            ],
            cfg,
        )
        .expect("opt");
        let stats = opt.step(&grads, 0.01).expect("step");
        // |g| = sqrt(4 * 9 + 2 * 1).
        assert!((stats.grad_norm - 38f64.sqrt()).abs() < 1e-12);
        let wv: Vec<Vec<f64>> = w.as_tensor().to_vec2().expect("v");
        let want = |w0: f64| w0 * (1.0 - 0.01 * 0.1) - 0.01;
        assert!((wv[0][0] - want(1.0)).abs() < 1e-12 && (wv[0][1] - want(-2.0)).abs() < 1e-12);
        // Bias: no decay, gradient -1 -> moves up by lr.
        assert!((b.as_tensor().to_vec1::<f64>().expect("v")[0] - 1.01).abs() < 1e-12);
    }

    #[test]
    fn clipping_scales_the_gradient() {
        // With clip, m after step 1 = (1 - b1) g * scale; the Adam update itself is scale-free,
        // so check the reported norm and that a missing gradient is an error.
        let w = Var::new(&[3.0f64, 4.0], &Device::Cpu).expect("w");
        let other = Var::new(&[1.0f64], &Device::Cpu).expect("o");
        let grads = w
            .as_tensor()
            .sqr()
            .expect("s")
            .sum_all()
            .expect("s")
            .backward()
            .expect("b");
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).expect("opt");
        assert!((opt.step(&grads, 0.1).expect("step").grad_norm - 10.0).abs() < 1e-12);
        let mut opt2 = AdamW::new(vec![("w".into(), w), ("other".into(), other)], cfg).expect("opt");
        let msg = opt2.step(&grads, 0.1).expect_err("must fail").to_string();
        assert!(msg.contains("`other` received no gradient"), "{msg}");
    }
}
