//! The CPU AdamW update and the gradients' sums of squares: chunks of 16,384 elements on the
//! rayon pool (the update in the parameter's element type, the sums in f64 added in chunk
//! order).

use candle_core::{bail, DType, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::AdamWStep;
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::slice;

/// `(w', m', v')` of one step on contiguous CPU tensors of one f32/f64 dtype and size.
pub(super) fn update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    match w.dtype() {
        DType::F32 => typed::<f32>(w, g, m, v, s),
        DType::F64 => typed::<f64>(w, g, m, v, s),
        other => bail!("fused adamw: unsupported dtype {other:?}"),
    }
}

/// Elements per work item on the rayon pool.
const CHUNK: usize = 16_384;

fn typed<T: Real + WithDType>(
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
        *slot = slice::<T>(cpu, l, "adamw operand")?;
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

/// `sum(x^2)` of each of `xs` (contiguous CPU f32/f64 tensors) in f64.
pub(super) fn sum_squares(xs: &[Tensor]) -> Result<Vec<f64>> {
    xs.iter()
        .map(|x| match x.dtype() {
            DType::F32 => typed_sum_squares::<f32>(x),
            DType::F64 => typed_sum_squares::<f64>(x),
            other => bail!("sum of squares: unsupported dtype {other:?}"),
        })
        .collect()
}

fn typed_sum_squares<T: Real + WithDType>(x: &Tensor) -> Result<f64> {
    let (st, l) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*st else {
        bail!("sum of squares: expected a CPU tensor")
    };
    let xs = slice::<T>(cpu, l, "sum of squares operand")?;
    let partial: Vec<f64> = xs
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| WithDType::to_f64(v).powi(2)).sum())
        .collect();
    Ok(partial.iter().sum())
}
