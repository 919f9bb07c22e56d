//! The CPU LayerNorm: rows on the rayon pool, in the AVX-512 build of the row loops where the
//! CPU has it.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::{reduce2, sum, Real, LANES};
use crate::kernels::cpu::raw::{avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice};

/// The forward on `(x, weight, bias)`.
pub(super) fn fwd(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-layer-norm",
        &[st[0].0],
        || fwd_typed::<f32>(eps, st),
        || fwd_typed::<f64>(eps, st),
    )
}

/// The backward on `(x, weight, dy)`: `dx` rows, then a `dw` row and a `db` row.
pub(super) fn bwd(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-layer-norm-grad",
        &[st[0].0],
        || bwd_typed::<f32>(eps, st),
        || bwd_typed::<f64>(eps, st),
    )
}

/// `(mean, 1 / sqrt(var + eps))` of a row: two lane-wise passes (mean, then the centred
/// squares), f64 across blocks (see [`reduce2`]).
#[inline(always)]
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mu = sum(x) / n;
    let m = T::from_f64(mu);
    let var = reduce2(x, x, |v, _| [(v - m) * (v - m)])[0] / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// One row of the forward: `o = (x - mu) r w + b`.
#[inline(always)]
fn fwd_row<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, o: &mut [T]) {
    let (mu, rs) = stats(x, eps);
    let (mu, rs) = (T::from_f64(mu), T::from_f64(rs));
    for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mu) * rs * w + b;
    }
}

/// One row of the backward: `dx` written into (or, with `accumulate`, added to) `o`, and the
/// row's `gy xh` and `gy` added to the block's f64 column sums `acc_w`, `acc_b`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_row<T: Real>(
    x: &[T],
    g: &[T],
    w: &[T],
    eps: f64,
    acc_w: &mut [f64],
    acc_b: &mut [f64],
    o: &mut [T],
    accumulate: bool,
) {
    let d = x.len();
    let (mu, rs) = stats(x, eps);
    let (mu, rs) = (T::from_f64(mu), T::from_f64(rs));
    // m1 = mean gy w, m2 = mean gy w xh, lane-wise.
    let (mut a1, mut a2) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    let (cx, cg, cw) = (x.chunks_exact(LANES), g.chunks_exact(LANES), w.chunks_exact(LANES));
    let (rx, rg, rw) = (cx.remainder(), cg.remainder(), cw.remainder());
    for ((cx, cg), cw) in cx.zip(cg).zip(cw) {
        for i in 0..LANES {
            let gh = cg[i] * cw[i];
            a1[i] = a1[i] + gh;
            a2[i] = a2[i] + gh * ((cx[i] - mu) * rs);
        }
    }
    let (mut m1, mut m2) = (0f64, 0f64);
    for ((&x, &g), &w) in rx.iter().zip(rg).zip(rw) {
        m1 += (g * w).to_f64();
        m2 += (g * w * ((x - mu) * rs)).to_f64();
    }
    m1 += a1.iter().map(|v| v.to_f64()).sum::<f64>();
    m2 += a2.iter().map(|v| v.to_f64()).sum::<f64>();
    let (m1, m2) = (T::from_f64(m1 / d as f64), T::from_f64(m2 / d as f64));
    for (((aw, ab), &x), &g) in acc_w.iter_mut().zip(acc_b.iter_mut()).zip(x).zip(g) {
        *aw += (g * ((x - mu) * rs)).to_f64();
        *ab += g.to_f64();
    }
    let dx = |x: T, g: T, w: T| rs * (g * w - m1 - (x - mu) * rs * m2);
    if accumulate {
        for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
            *o = *o + dx(x, g, w);
        }
    } else {
        for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
            *o = dx(x, g, w);
        }
    }
}

avx512_dispatch!(fn fwd_row_any<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, o: &mut [T]) => fwd_row);
avx512_dispatch!(fn bwd_row_any<T: Real>(x: &[T], g: &[T], w: &[T], eps: f64, acc_w: &mut [f64], acc_b: &mut [f64], o: &mut [T], accumulate: bool) => bwd_row);

fn fwd_typed<T: Real>(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(st[0].0, st[0].1, "x")?;
    let w = slice::<T>(st[1].0, st[1].1, "weight")?;
    let b = slice::<T>(st[2].0, st[2].1, "bias")?;
    let (_, d) = rows_width(st[0].1.shape())?;
    Ok((T::storage(forward_rows(x, w, b, d, eps)), st[0].1.shape().clone()))
}

/// The LayerNorm of the `d`-wide rows of `x` (on slices, for ops that fuse several layers).
pub(crate) fn forward_rows<T: Real>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut out = output_vec(x.len());
    for_rows(&mut out, d, d, |r, o| fwd_row_any(&x[r * d..(r + 1) * d], w, b, eps, o));
    out
}

/// Rows per block of the backward (each block reduces its own `dw`, `db`).
const BLOCK_ROWS: usize = 64;

fn bwd_typed<T: Real>(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(st[0].0, st[0].1, "x")?;
    let w = slice::<T>(st[1].0, st[1].1, "weight")?;
    let g = slice::<T>(st[2].0, st[2].1, "grad")?;
    let (rows, d) = rows_width(st[0].1.shape())?;
    let mut out = output_vec((rows + 2) * d);
    let (dx, dwb) = out.split_at_mut(rows * d);
    let partial = backward_rows(x, w, g, d, eps, dx, false);
    for (o, p) in dwb.iter_mut().zip(&partial) {
        *o = T::from_f64(*p);
    }
    Ok((T::storage(out), Shape::from((rows + 2, d))))
}

/// The LayerNorm backward on slices: writes `dx` (or adds it to what `dx` holds, with
/// `accumulate`) and returns `dw` followed by `db` (`2 d` values, f64).
pub(crate) fn backward_rows<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    d: usize,
    eps: f64,
    dx: &mut [T],
    accumulate: bool,
) -> Vec<f64> {
    dx.par_chunks_mut(BLOCK_ROWS * d)
        .enumerate()
        .map(|(bi, block)| {
            let mut acc = vec![0f64; 2 * d];
            let (acc_w, acc_b) = acc.split_at_mut(d);
            for (i, o) in block.chunks_mut(d).enumerate() {
                let r = bi * BLOCK_ROWS + i;
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                bwd_row_any(xr, gr, w, eps, acc_w, acc_b, o, accumulate);
            }
            acc
        })
        .reduce(
            || vec![0f64; 2 * d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}
