//! The CPU RMSNorm: rows on the rayon pool, row statistics in f64.

use candle_core::{bail, CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice};

/// The forward on `x` (`s1`) and the weight (`s2`).
pub(super) fn fwd(eps: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-rms-norm",
        &[s1, s2],
        || fwd_typed::<f32>(eps, s1, l1, s2, l2),
        || fwd_typed::<f64>(eps, s1, l1, s2, l2),
    )
}

/// The backward on `x` (`s1`) and `dy` (`s2`) with the forward's `weight`: `dx` rows, then a
/// `dw` row.
pub(super) fn bwd(
    eps: f64,
    weight: &Tensor,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (_, d) = rows_width(l1.shape())?;
    by_dtype(
        "fused-rms-norm-grad",
        &[s1, s2],
        || bwd_typed::<f32>(eps, weight, slice(s1, l1, "x")?, slice(s2, l2, "grad")?, d),
        || bwd_typed::<f64>(eps, weight, slice(s1, l1, "x")?, slice(s2, l2, "grad")?, d),
    )
}

/// `1 / sqrt(mean x^2 + eps)` of a row, in f64.
#[inline]
fn inv_rms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ms = x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / x.len() as f64;
    1.0 / (ms + eps).sqrt()
}

fn fwd_typed<T: Real>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "x")?;
    let w = slice::<T>(s2, l2, "weight")?;
    let (_, d) = rows_width(l1.shape())?;
    let mut out = output_vec(x.len());
    for_rows(&mut out, d, d, |r, o| {
        let row = &x[r * d..(r + 1) * d];
        let rs = T::from_f64(inv_rms(row, eps));
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v * rs * w;
        }
    });
    Ok((T::storage(out), l1.shape().clone()))
}

/// Rows per block of the backward (each block reduces its own `dw`).
const BLOCK_ROWS: usize = 64;

fn bwd_typed<T: Real>(eps: f64, weight: &Tensor, x: &[T], g: &[T], d: usize) -> Result<(CpuStorage, Shape)> {
    let (ws, wl) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(ws) = &*ws else {
        bail!("fused-rms-norm-grad: expected a CPU weight")
    };
    let w = slice::<T>(ws, wl, "weight")?;
    let rows = x.len() / d;
    let mut out = output_vec((rows + 1) * d);
    let (dx, dw_out) = out.split_at_mut(rows * d);
    let dw = dx
        .par_chunks_mut(BLOCK_ROWS * d)
        .enumerate()
        .map(|(bi, block)| {
            let mut acc = vec![0f64; d];
            for (i, o) in block.chunks_mut(d).enumerate() {
                let r = bi * BLOCK_ROWS + i;
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                let rs = inv_rms(xr, eps);
                let mut m = 0f64;
                for j in 0..d {
                    let xh = xr[j].to_f64() * rs;
                    m += gr[j].to_f64() * w[j].to_f64() * xh;
                    acc[j] += gr[j].to_f64() * xh;
                }
                let m = m / d as f64;
                for j in 0..d {
                    let xh = xr[j].to_f64() * rs;
                    o[j] = T::from_f64(rs * (gr[j].to_f64() * w[j].to_f64() - xh * m));
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    for (o, v) in dw_out.iter_mut().zip(dw) {
        *o = T::from_f64(v);
    }
    Ok((T::storage(out), Shape::from((rows + 1, d))))
}
