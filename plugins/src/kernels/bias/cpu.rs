//! The CPU bias add and row sums.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::avx512_dispatch;
use crate::kernels::cpu::rows::{by_dtype, rows_width, slice};

/// The forward on `x` (`s1`) and the bias (`s2`).
pub(super) fn fwd(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-bias-add",
        &[s1],
        || fwd_typed::<f32>(s1, l1, s2, l2),
        || fwd_typed::<f64>(s1, l1, s2, l2),
    )
}

/// The column sums of a `[.., n]` storage: `[n]`.
pub(super) fn sum_rows(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-sum-rows",
        &[s],
        || sum_rows_typed::<f32>(s, l),
        || sum_rows_typed::<f64>(s, l),
    )
}

fn fwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "x")?;
    let b = slice::<T>(s2, l2, "bias")?;
    let (_, n) = rows_width(l1.shape())?;
    // Built by `extend` (one pass writing each element once) rather than zeroed and then
    // overwritten: the zeroing `memset` cost as much as the add itself.
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        out.extend(row.iter().zip(b).map(|(&x, &b)| x + b));
    }
    Ok((T::storage(out), l1.shape().clone()))
}

/// Rows per block of the column sums (each block sums into its own f64 row).
const BLOCK_ROWS: usize = 128;

fn sum_rows_typed<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(s, l, "grad")?;
    let (_, n) = rows_width(l.shape())?;
    let total = column_sums(g, n);
    Ok((T::storage(total.into_iter().map(T::from_f64).collect()), Shape::from(n)))
}

/// `acc += row`, widened to f64.
#[inline(always)]
fn add_row<T: Real>(acc: &mut [f64], row: &[T]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += v.to_f64();
    }
}

avx512_dispatch!(fn add_row_any<T: Real>(acc: &mut [f64], row: &[T]) => add_row);

/// The sums over rows of the `n`-wide rows of `g` (f64 within blocks of rows, on the rayon
/// pool, blocks summed after): a bias gradient.
pub(crate) fn column_sums<T: Real>(g: &[T], n: usize) -> Vec<f64> {
    g.par_chunks(BLOCK_ROWS * n)
        .map(|block| {
            let mut acc = vec![0f64; n];
            for row in block.chunks(n) {
                add_row_any(&mut acc, row);
            }
            acc
        })
        .reduce(
            || vec![0f64; n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}
