//! Fused AdamW update (Loshchilov & Hutter, 2019): one pass over a parameter, its gradient and
//! both moments instead of a dozen candle ops (each a full pass and a fresh tensor).
//!
//! With `g' = s g` (`s` the clipping scale):
//! `m' = b1 m + (1 - b1) g'`, `v' = b2 v + (1 - b2) g'^2`,
//! `w' = w (1 - lr wd) - lr (m' / bc1) / (sqrt(v' / bc2) + eps)`, where `bc1 = 1 - b1^t` and
//! `bc2 = 1 - b2^t`: the formula of the composed update in the host's optimizer, in the same
//! element type (the two agree to rounding: candle divides by a scalar as a multiply by its
//! reciprocal).

use candle_core::{bail, Result, Storage, Tensor};
use rayon::prelude::*;

use super::fastmath::Real;
use super::rows::output_vec;

/// The scalars of one AdamW step for one parameter.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `1 - beta1^t`.
    pub bias_correction1: f64,
    /// `1 - beta2^t`.
    pub bias_correction2: f64,
    /// `epsilon`.
    pub eps: f64,
    /// The parameter's learning rate (group factor applied).
    pub lr: f64,
    /// The parameter's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient scale from global-norm clipping (1 = none).
    pub grad_scale: f64,
}

/// Whether [`adamw_update`] can run on these tensors: CPU, one f32/f64 dtype, contiguous, of
/// one element count.
pub fn usable(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [w, g, m, v];
    super::fusable(w)
        && all
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == w.dtype() && t.is_contiguous())
        && all.iter().all(|t| t.elem_count() == w.elem_count())
}

/// `(w', m', v')` of one AdamW step (see the module doc), each shaped like `w`.
pub fn adamw_update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    if !usable(w, g, m, v) {
        bail!("fused adamw: expected contiguous CPU f32/f64 tensors of one size and dtype")
    }
    match w.dtype() {
        candle_core::DType::F32 => typed::<f32>(w, g, m, v, s),
        candle_core::DType::F64 => typed::<f64>(w, g, m, v, s),
        other => bail!("fused adamw: unsupported dtype {other:?}"),
    }
}

/// Elements per work item on the rayon pool.
const CHUNK: usize = 16_384;

fn typed<T: Real + candle_core::WithDType>(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    s: AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    let guards = [w, g, m, v].map(|t| t.storage_and_layout());
    let mut slices: [&[T]; 4] = [&[]; 4];
    for (slot, (st, l)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(cpu) = &**st else {
            bail!("fused adamw: expected CPU tensors")
        };
        *slot = super::rows::slice::<T>(cpu, l, "adamw operand")?;
    }
    let [ws, gs, ms, vs] = slices;
    let n = ws.len();
    let (mut w2, mut m2, mut v2) = (output_vec::<T>(n), output_vec::<T>(n), output_vec::<T>(n));
    let c = |x: f64| <T as Real>::from_f64(x);
    let (b1, b2, one_b1, one_b2) = (c(s.beta1), c(s.beta2), c(1.0 - s.beta1), c(1.0 - s.beta2));
    let (bc1, bc2, eps, lr, scale) = (
        c(s.bias_correction1),
        c(s.bias_correction2),
        c(s.eps),
        c(s.lr),
        c(s.grad_scale),
    );
    let keep = c(1.0 - s.lr * s.weight_decay);
    let (decay, clip) = (s.weight_decay > 0.0, s.grad_scale != 1.0);
    w2.par_chunks_mut(CHUNK)
        .zip(m2.par_chunks_mut(CHUNK))
        .zip(v2.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((wo, mo), vo))| {
            let r = i * CHUNK..(i * CHUNK + wo.len());
            for ((((wo, mo), vo), (&w, &g)), (&m, &v)) in wo
                .iter_mut()
                .zip(mo)
                .zip(vo)
                .zip(ws[r.clone()].iter().zip(&gs[r.clone()]))
                .zip(ms[r.clone()].iter().zip(&vs[r]))
            {
                let g = if clip { g * scale } else { g };
                let m = m * b1 + g * one_b1;
                let v = v * b2 + g * g * one_b2;
                let update = (m / bc1) / ((v / bc2).sqrt() + eps);
                let w = if decay { w * keep } else { w };
                *wo = w - update * lr;
                *mo = m;
                *vo = v;
            }
        });
    drop(guards);
    let out = |x: Vec<T>| Tensor::from_vec(x, w.shape(), w.device());
    Ok((out(w2)?, out(m2)?, out(v2)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// The composed update, op for op as the host's optimizer writes it.
    fn composite(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> (Tensor, Tensor, Tensor) {
        let g = if s.grad_scale != 1.0 {
            (g * s.grad_scale).expect("g")
        } else {
            g.clone()
        };
        let m = ((m * s.beta1).expect("m") + (&g * (1.0 - s.beta1)).expect("m")).expect("m");
        let v = ((v * s.beta2).expect("v") + (g.sqr().expect("v") * (1.0 - s.beta2)).expect("v")).expect("v");
        let denom = ((&v / s.bias_correction2).and_then(|t| t.sqrt()).expect("d") + s.eps).expect("d");
        let update = ((&m / s.bias_correction1).expect("u") / denom).expect("u");
        let w = if s.weight_decay > 0.0 {
            (w * (1.0 - s.lr * s.weight_decay)).expect("w")
        } else {
            w.clone()
        };
        ((w - (update * s.lr).expect("u")).expect("w"), m, v)
    }

    /// Three steps from zero moments match the composite update in f64 and f32, with and
    /// without decay and clipping.
    #[test]
    fn matches_the_composed_update() {
        let dev = Device::Cpu;
        let n = 40_003; // more than two work items, not a multiple of one
        let base = Tensor::arange(0f64, n as f64, &dev).expect("a");
        for dtype in [DType::F64, DType::F32] {
            for (wd, scale) in [(0.0, 1.0), (0.1, 0.37)] {
                let mut wf = (&base * 0.001)
                    .and_then(|t| t.sin())
                    .and_then(|t| t.to_dtype(dtype))
                    .expect("w");
                let mut mf = wf.zeros_like().expect("m");
                let mut vf = wf.zeros_like().expect("v");
                let (mut wc, mut mc, mut vc) = (wf.clone(), mf.clone(), vf.clone());
                for t in 1..=3 {
                    let g = (&base * (0.003 * t as f64))
                        .and_then(|x| x.cos())
                        .and_then(|x| x.to_dtype(dtype))
                        .expect("g");
                    let s = AdamWStep {
                        beta1: 0.9,
                        beta2: 0.95,
                        bias_correction1: 1.0 - 0.9f64.powi(t),
                        bias_correction2: 1.0 - 0.95f64.powi(t),
                        eps: 1e-8,
                        lr: 3e-3,
                        weight_decay: wd,
                        grad_scale: scale,
                    };
                    (wf, mf, vf) = adamw_update(&wf, &g, &mf, &vf, s).expect("fused");
                    (wc, mc, vc) = composite(&wc, &g, &mc, &vc, s);
                }
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                for (what, a, b) in [("w", &wf, &wc), ("m", &mf, &mc), ("v", &vf, &vc)] {
                    let a: Vec<f64> = a.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("a");
                    let b: Vec<f64> = b.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("b");
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (x - y).abs() <= tol * y.abs().max(1e-3),
                            "{dtype:?} wd {wd} {what}[{i}]: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_operands_are_refused() {
        let dev = Device::Cpu;
        let w = Tensor::zeros(4, DType::F32, &dev).expect("w");
        let g = Tensor::zeros(5, DType::F32, &dev).expect("g");
        let s = AdamWStep {
            beta1: 0.9,
            beta2: 0.95,
            bias_correction1: 0.1,
            bias_correction2: 0.05,
            eps: 1e-8,
            lr: 1e-3,
            weight_decay: 0.0,
            grad_scale: 1.0,
        };
        assert!(adamw_update(&w, &g, &w, &w, s).is_err());
        let g64 = Tensor::zeros(4, DType::F64, &dev).expect("g");
        assert!(!usable(&w, &g64, &w, &w));
    }
}
