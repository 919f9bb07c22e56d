//! The CPU cross-entropy: rows on the rayon pool, sums in f64.

use candle_core::{bail, CpuStorage, Layout, Result, Shape};

use super::COLS;
use crate::kernels::cpu::fastmath::{row_max, sum, sum_exp, Real};
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice, slice_u32, with_last};

/// The forward on the logits (`s1`) and the `u32` targets (`s2`): `(L, lse)` per row.
pub(super) fn fwd(eps: f64, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-cross-entropy",
        &[s1],
        || fwd_typed::<f32>(eps, s1, l1, s2, l2),
        || fwd_typed::<f64>(eps, s1, l1, s2, l2),
    )
}

/// The backward on `(logits, targets, (L, lse, g) per row)`: `g dL/dz`.
pub(super) fn bwd(eps: f64, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-cross-entropy-grad",
        &[st[0].0],
        || bwd_typed::<f32>(eps, st),
        || bwd_typed::<f64>(eps, st),
    )
}

fn fwd_typed<T: Real>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(s1, l1, "logits")?;
    let y = slice_u32(s2, l2, "targets")?;
    let (rows, v) = rows_width(l1.shape())?;
    if let Some(bad) = y.iter().find(|&&t| t as usize >= v) {
        bail!("cross-entropy: target {bad} is outside the vocabulary of {v}")
    }
    let mut out = vec![T::ZERO; rows * COLS];
    for_rows(&mut out, COLS, v, |r, o| {
        let row = &z[r * v..(r + 1) * v];
        let m = row_max(row);
        let lse = m.to_f64() + sum_exp(row, T::ONE, m).ln();
        let nll = lse - row[y[r] as usize].to_f64();
        let loss = if eps > 0.0 {
            (1.0 - eps) * nll + eps * (lse - sum(row) / v as f64)
        } else {
            nll
        };
        o[0] = T::from_f64(loss);
        o[1] = T::from_f64(lse);
    });
    Ok((T::storage(out), with_last(l1.shape(), COLS)))
}

type Arg<'a> = (&'a CpuStorage, &'a Layout);

fn bwd_typed<T: Real>(eps: f64, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(st[0].0, st[0].1, "logits")?;
    let y = slice_u32(st[1].0, st[1].1, "targets")?;
    let aux = slice::<T>(st[2].0, st[2].1, "saved row statistics")?;
    let (_, v) = rows_width(st[0].1.shape())?;
    let w = COLS + 1;
    let mut out = output_vec(z.len());
    for_rows(&mut out, v, v, |r, o| {
        let (lse, g) = (aux[r * w + 1], aux[r * w + COLS]);
        let shift = T::from_f64(eps / v as f64);
        for (o, &x) in o.iter_mut().zip(&z[r * v..(r + 1) * v]) {
            *o = g * ((x - lse).exp() - shift);
        }
        let t = y[r] as usize;
        o[t] = o[t] - g * T::from_f64(1.0 - eps);
    });
    Ok((T::storage(out), st[0].1.shape().clone()))
}
