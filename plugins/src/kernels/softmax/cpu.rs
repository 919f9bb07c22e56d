//! The CPU softmax: rows on the rayon pool, the `exp` sum in f64.

use candle_core::{CpuStorage, Layout, Result, Shape};

use crate::kernels::cpu::fastmath::{row_max, Real};
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice};

/// The forward of the fused softmax (`causal`: row `r` keeps its first `r % width + 1` columns).
pub(super) fn fwd(causal: bool, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-softmax",
        &[s],
        || fwd_typed::<f32>(causal, s, l),
        || fwd_typed::<f64>(causal, s, l),
    )
}

/// The backward from the saved output `y` (`s1`) and the incoming gradient (`s2`).
pub(super) fn bwd(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-softmax-grad",
        &[s1],
        || bwd_typed::<f32>(s1, l1, s2, l2),
        || bwd_typed::<f64>(s1, l1, s2, l2),
    )
}

/// Columns that count in row `r` of a `width`-wide matrix.
#[inline]
fn live(causal: bool, r: usize, width: usize) -> usize {
    if causal {
        r % width + 1
    } else {
        width
    }
}

fn fwd_typed<T: Real>(causal: bool, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "scores")?;
    let (_, v) = rows_width(l.shape())?;
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, v, v, |r, o| {
        let n = live(causal, r, v);
        let row = &x[r * v..r * v + n];
        let m = row_max(row);
        let mut total = 0f64;
        for (o, &x) in o[..n].iter_mut().zip(row) {
            let e = (x - m).exp();
            *o = e;
            total += e.to_f64();
        }
        let inv = T::from_f64(1.0 / total);
        for o in o[..n].iter_mut() {
            *o = *o * inv;
        }
    });
    Ok((T::storage(out), l.shape().clone()))
}

fn bwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let y = slice::<T>(s1, l1, "softmax output")?;
    let g = slice::<T>(s2, l2, "grad")?;
    let (_, v) = rows_width(l1.shape())?;
    let mut out = vec![T::ZERO; y.len()];
    for_rows(&mut out, v, v, |r, o| {
        let (yr, gr) = (&y[r * v..(r + 1) * v], &g[r * v..(r + 1) * v]);
        let dot: f64 = yr.iter().zip(gr).map(|(&y, &g)| (y * g).to_f64()).sum();
        let dot = T::from_f64(dot);
        for ((o, &y), &g) in o.iter_mut().zip(yr).zip(gr) {
            *o = y * (g - dot);
        }
    });
    Ok((T::storage(out), l1.shape().clone()))
}
