//! AdamW (Loshchilov & Hutter, 2019) over parameter groups, with global-norm gradient clipping.
//!
//! For each parameter `w` with gradient `g` at step `t`, in a group with learning-rate factor
//! `m` and weight decay `wd`:
//! `mom = b1 mom + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `w = w (1 - lr m wd) - lr m (mom / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
//! A group with `m = 0` is frozen: its parameters get no optimizer state and are never written.
//!
//! The optimizer also owns the trainable parameters' gradient buffers ([`LeafGrads`]): fused
//! ops write a parameter's gradient there in place while its collector is active
//! ([`AdamW::leaf_grads`]), and [`AdamW::finish_grads`] merges them with what candle's
//! backward left in its gradient store.

use std::sync::Arc;

use candle_core::{backprop::GradStore, Tensor};
use retort_plugins::kernels::adamw;
use retort_plugins::kernels::leaf_grads::LeafGrads;

use retort_core::{Error, Result};

use crate::assemble::GroupedParam;

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay for parameters of the default rule.
    pub weight_decay: f64,
    /// Global-norm clip; 0 disables.
    pub grad_clip: f64,
}

struct ParamState {
    p: GroupedParam,
    m: Tensor,
    v: Tensor,
}

/// AdamW over the trainable (non-frozen) parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    groups: usize,
    t: i32,
    leaf: Arc<LeafGrads>,
}

/// Gradient norms of one step.
#[derive(Debug, Clone, Default)]
pub struct GradNorms {
    /// Global L2 norm over every trainable parameter (before clipping).
    pub total: f64,
    /// L2 norm per group (frozen groups: 0).
    pub per_group: Vec<f64>,
}

impl AdamW {
    /// An optimizer with zeroed moments for every parameter whose `lr_mult > 0`.
    pub fn new(params: Vec<GroupedParam>, groups: usize, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .filter(|p| p.lr_mult > 0.0)
            .map(|p| {
                // Two buffers of their own: the update writes both moments in place.
                let w = p.var.as_tensor();
                Ok(ParamState {
                    m: w.zeros_like()?,
                    v: w.zeros_like()?,
                    p,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let leaf = LeafGrads::new(params.iter().map(|s| s.p.var.as_tensor()));
        Ok(AdamW {
            cfg,
            params,
            groups,
            t: 0,
            leaf,
        })
    }

    /// The moments (`m.<name>`, `v.<name>`) and the step count, for a checkpoint.
    pub fn export_state(&self) -> (std::collections::HashMap<String, Tensor>, i32) {
        let mut out = std::collections::HashMap::new();
        for s in &self.params {
            out.insert(format!("m.{}", s.p.name), s.m.clone());
            out.insert(format!("v.{}", s.p.name), s.v.clone());
        }
        (out, self.t)
    }

    /// Restores moments and step count from [`AdamW::export_state`]'s output.
    pub fn import_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, t: i32) -> Result<()> {
        for s in &mut self.params {
            let (dtype, device) = (s.m.dtype(), s.m.device().clone());
            let get = |k: String| -> Result<Tensor> {
                let x = tensors
                    .get(&k)
                    .ok_or_else(|| Error::Runtime(format!("optimizer state lacks `{k}`")))?;
                // A tensor of its own: the update writes the moments in place.
                Ok(x.to_dtype(dtype)?.to_device(&device)?.copy()?)
            };
            s.m = get(format!("m.{}", s.p.name))?;
            s.v = get(format!("v.{}", s.p.name))?;
        }
        self.t = t;
        Ok(())
    }

    /// Names of the trainable parameters, in gradient order.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|s| s.p.name.as_str()).collect()
    }

    /// The gradient buffers of the trainable parameters: make it the thread's collector
    /// ([`LeafGrads::collect`]) around a step's backward passes, after [`LeafGrads::clear`].
    pub fn leaf_grads(&self) -> &Arc<LeafGrads> {
        &self.leaf
    }

    /// The gradients of the trainable parameters from `store` alone (`None` where it has
    /// none), detached (a gradient computed from tracked tensors carries the step's graph;
    /// keeping it would keep every step's graph alive).
    pub fn store_grads(&self, store: &GradStore) -> Vec<Option<Tensor>> {
        self.params
            .iter()
            .map(|s| store.get(s.p.var.as_tensor()).map(Tensor::detach))
            .collect()
    }

    /// Each parameter's whole gradient: what [`AdamW::store_grads`] gave (`partial`, summed
    /// over a step's backward passes) plus what its buffer collected, which it takes (a buffer
    /// is handed out as it is: use the gradients up before the next step's backward). A
    /// parameter with neither is an error: the graph does not reach it.
    pub fn finish_grads(&self, partial: Vec<Option<Tensor>>) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .zip(partial)
            .map(|(s, from_store)| {
                let param = s.p.var.as_tensor();
                match (self.leaf.take(param), from_store) {
                    (Some(a), Some(b)) => Ok((a + b)?),
                    (Some(g), None) | (None, Some(g)) => Ok(g),
                    (None, None) => Err(Error::Runtime(format!(
                        "parameter `{}` received no gradient (is a non-differentiable op on its path?)",
                        s.p.name
                    ))),
                }
            })
            .collect()
    }

    /// [`AdamW::finish_grads`] of one gradient store.
    pub fn collect_grads(&self, store: &GradStore) -> Result<Vec<Tensor>> {
        self.finish_grads(self.store_grads(store))
    }

    /// Global and per-group L2 norms of `grads`.
    pub fn norms(&self, grads: &[Tensor]) -> Result<GradNorms> {
        // On a GPU one reduction for all the gradients and one transfer (`kernels::adamw`).
        let squares = adamw::sum_squares(grads)?;
        let mut per_group = vec![0.0f64; self.groups];
        for (s, sq) in self.params.iter().zip(squares) {
            per_group[s.p.group] += sq;
        }
        let total = per_group.iter().sum::<f64>().sqrt();
        Ok(GradNorms {
            total,
            per_group: per_group.into_iter().map(f64::sqrt).collect(),
        })
    }

    /// One update at base learning rate `lr`, clipping `grads` to the configured global norm
    /// (`total_norm` from [`AdamW::norms`]).
    pub fn step(&mut self, grads: Vec<Tensor>, lr: f64, total_norm: f64) -> Result<()> {
        let scale = if self.cfg.grad_clip > 0.0 && total_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / total_norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        // One fused update per set of parameters sharing a learning rate and a decay: on a GPU
        // one in-place kernel launch for the set, on the CPU one fused pass per parameter
        // (`kernels::adamw`).
        let mut sets: Vec<((u64, u64), Vec<adamw::AdamWSlot<'_>>)> = Vec::new();
        for (s, g) in self.params.iter_mut().zip(&grads) {
            let key = (s.p.lr_mult.to_bits(), s.p.weight_decay.to_bits());
            let slot = adamw::AdamWSlot {
                w: &s.p.var,
                g,
                m: &mut s.m,
                v: &mut s.v,
            };
            match sets.iter_mut().find(|(k, _)| *k == key) {
                Some((_, set)) => set.push(slot),
                None => sets.push((key, vec![slot])),
            }
        }
        for ((lr_mult, weight_decay), mut set) in sets {
            let step = adamw::AdamWStep {
                beta1: b1,
                beta2: b2,
                bias_correction1: bc1,
                bias_correction2: bc2,
                eps: self.cfg.eps,
                lr: lr * f64::from_bits(lr_mult),
                weight_decay: f64::from_bits(weight_decay),
                grad_scale: scale,
            };
            adamw::adamw_group_step(&mut set, step)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::assign_groups;
    use candle_core::Device;
    use candle_core::Var;
    use retort_core::config::ParamGroupSpec;

    fn cfg(wd: f64, clip: f64) -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
            weight_decay: wd,
            grad_clip: clip,
        }
    }

    #[test]
    fn first_step_matches_reference_update() {
        // Reference: at t = 1, m/(1-b1) = g and v/(1-b2) = g^2, so the update is
        // lr * g / (|g| + eps) = lr * sign(g), plus decay w * lr * wd for matrices.
        let w = Var::new(&[[1.0f64, -2.0], [0.5, 0.0]], &Device::Cpu).expect("w");
        let b = Var::new(&[1.0f64, 1.0], &Device::Cpu).expect("b");
        let loss = ((w.as_tensor().sum_all().expect("s") * 3.0).expect("m") - b.as_tensor().sum_all().expect("s"))
            .expect("sub");
        let store = loss.backward().expect("bwd");
        let vars = vec![
            ("h.0.mlp.c_fc.weight".to_string(), w.clone()),
            ("h.0.mlp.c_fc.bias".to_string(), b.clone()),
        ];
        let (params, groups) = assign_groups(vars, &[], 0.1, "train.param_groups").expect("groups");
        let mut opt = AdamW::new(params, groups.len(), cfg(0.1, 0.0)).expect("opt");
        let grads = opt.collect_grads(&store).expect("grads");
        let norms = opt.norms(&grads).expect("norms");
        // |g| = sqrt(4 * 9 + 2 * 1).
        assert!((norms.total - 38f64.sqrt()).abs() < 1e-12);
        opt.step(grads, 0.01, norms.total).expect("step");
        let wv: Vec<Vec<f64>> = w.as_tensor().to_vec2().expect("v");
        let want = |w0: f64| w0 * (1.0 - 0.01 * 0.1) - 0.01;
        assert!((wv[0][0] - want(1.0)).abs() < 1e-12 && (wv[0][1] - want(-2.0)).abs() < 1e-12);
        // Bias: no decay, gradient -1 -> moves up by lr.
        assert!((b.as_tensor().to_vec1::<f64>().expect("v")[0] - 1.01).abs() < 1e-12);
    }

    #[test]
    fn groups_scale_lr_freeze_and_report() {
        let dev = Device::Cpu;
        let emb = Var::new(&[[1.0f64, 2.0]], &dev).expect("e");
        let w = Var::new(&[[1.0f64, 1.0]], &dev).expect("w");
        let frozen = Var::new(&[3.0f64, 4.0], &dev).expect("f");
        let loss = (emb.as_tensor().sum_all().expect("s")
            + w.as_tensor().sum_all().expect("s")
            + frozen.as_tensor().sum_all().expect("s"))
        .expect("add");
        let store = loss.backward().expect("bwd");
        let specs = vec![
            ParamGroupSpec {
                pattern: r".*wte.*".into(),
                lr_mult: 0.1,
                weight_decay: None,
            },
            ParamGroupSpec {
                pattern: r"ln_f\..*".into(),
                lr_mult: 0.0,
                weight_decay: None,
            },
        ];
        let vars = vec![
            ("transformer.wte.weight".to_string(), emb.clone()),
            ("h.0.w".to_string(), w.clone()),
            ("ln_f.bias".to_string(), frozen.clone()),
        ];
        let (params, groups) = assign_groups(vars, &specs, 0.0, "train.param_groups").expect("groups");
        assert_eq!(groups.iter().map(|g| g.tensors).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert_eq!(groups[0].parameters, 2);
        let mut opt = AdamW::new(params, groups.len(), cfg(0.0, 0.0)).expect("opt");
        assert_eq!(
            opt.names(),
            vec!["transformer.wte.weight", "h.0.w"],
            "frozen has no optimizer state"
        );
        let grads = opt.collect_grads(&store).expect("grads");
        let n = opt.norms(&grads).expect("norms");
        assert_eq!(n.per_group.len(), 3);
        opt.step(grads, 0.1, n.total).expect("step");
        // First Adam step moves by lr * lr_mult * sign(g).
        assert!((emb.as_tensor().to_vec2::<f64>().expect("v")[0][0] - (1.0 - 0.01)).abs() < 1e-9);
        assert!((w.as_tensor().to_vec2::<f64>().expect("v")[0][0] - (1.0 - 0.1)).abs() < 1e-9);
        assert_eq!(frozen.as_tensor().to_vec1::<f64>().expect("v"), vec![3.0, 4.0]);
    }

    #[test]
    fn missing_gradient_is_an_error() {
        let w = Var::new(&[3.0f64, 4.0], &Device::Cpu).expect("w");
        let other = Var::new(&[1.0f64], &Device::Cpu).expect("o");
        let store = w
            .as_tensor()
            .sqr()
            .expect("s")
            .sum_all()
            .expect("s")
            .backward()
            .expect("b");
        let (params, groups) = assign_groups(
            vec![("w".into(), w), ("other".into(), other)],
            &[],
            0.0,
            "train.param_groups",
        )
        .expect("g");
        let opt = AdamW::new(params, groups.len(), cfg(0.0, 1.0)).expect("opt");
        let msg = opt.collect_grads(&store).expect_err("must fail").to_string();
        assert!(msg.contains("`other` received no gradient"), "{msg}");
    }
}
