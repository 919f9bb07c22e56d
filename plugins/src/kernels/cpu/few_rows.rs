//! Products with few rows against a weight stored row-major `[n, k]` and read transposed (the
//! linear layers of decoding: a handful of tokens against the whole model). `gemm` packs the
//! weight into its panel layout on every call, which for a few rows costs more than the
//! product itself; here each output `(i, j)` is the dot product of row `i` of `a` with row `j`
//! of the weight, both contiguous, so the weight is read once, in place.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::raw::avx512_dispatch;
use super::raw::gemm::Mat;
use super::raw::{as_f32, as_f32_mut};
use crate::kernels::cpu::fastmath::Real;

/// Products with at most this many rows take [`few_rows_into`] (when the layouts allow it).
pub const FEW_ROWS: usize = 32;

/// Lanes of independent partial sums in a dot product (what lets it vectorize).
const LANES: usize = 16;

/// Whether [`few_rows_into`] computes `a @ b`: few rows, `a`'s rows contiguous, and `b` the
/// transpose of a row-major matrix (its columns contiguous).
pub fn applies<T: Real>(a: &Mat<T>, b: &Mat<T>) -> bool {
    a.rows() <= FEW_ROWS && a.col_stride() == 1 && b.row_stride() == 1 && a.cols() >= LANES
}

/// `dst [m, n] = (dst if accumulate) + a [m, k] @ b [k, n]` for a layout where [`applies`]:
/// row `i` of `a` dotted with column `j` of `b`, columns split over the rayon pool.
///
/// # Panics
/// When the inner dims differ, `dst` does not hold `m * n` elements or [`applies`] is false.
pub fn few_rows_into<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>) {
    let (m, k, n) = (a.rows(), a.cols(), b.cols());
    assert!(
        b.rows() == k && dst.len() == m * n && applies(a, b),
        "few_rows_into: shapes"
    );
    let rows: Vec<&[T]> = (0..m).map(|i| a.row(i)).collect();
    let cols: Vec<&[T]> = (0..n).map(|j| b.col(j)).collect();
    // Blocks of 64 output columns per task; a block's results touch every row of `dst`, so
    // they are collected and scattered after.
    let block = 64;
    let blocks: Vec<Vec<T>> = cols
        .par_chunks(block)
        .map(|ws| {
            let mut out = vec![T::ZERO; ws.len() * m];
            dots_into(&rows, ws, &mut out);
            out
        })
        .collect();
    for (bi, vals) in blocks.iter().enumerate() {
        for (jj, col) in vals.chunks_exact(m).enumerate() {
            let j = bi * block + jj;
            for (i, v) in col.iter().enumerate() {
                let d = &mut dst[i * n + j];
                *d = if accumulate { *d + *v } else { *v };
            }
        }
    }
}

/// `out[j * m + i] = dot(rows[i], ws[j])`: in f32 with AVX-512 FMAs where the CPU has them
/// (LLVM makes the generic loop two lanes wide), else the generic loop.
pub(crate) fn dots_into<T: Real>(rows: &[&[T]], ws: &[&[T]], out: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if as_f32(&out[..0]).is_some() {
        let rows32: Option<Vec<&[f32]>> = rows.iter().map(|r| as_f32(r)).collect();
        let ws32: Option<Vec<&[f32]>> = ws.iter().map(|w| as_f32(w)).collect();
        if let (Some(rows32), Some(ws32), Some(out32)) = (rows32, ws32, as_f32_mut(out)) {
            return dots_f32(&rows32, &ws32, out32);
        }
    }
    dots(rows, ws, out)
}

#[cfg(target_arch = "x86_64")]
avx512_dispatch!(fn dots_f32(rows: &[&[f32]], ws: &[&[f32]], out: &mut [f32]) => super::raw::avx512::dot_rows, else dots);

/// `out[j * m + i] = dot(rows[i], ws[j])`.
#[inline(always)]
fn dots<T: Real>(rows: &[&[T]], ws: &[&[T]], out: &mut [T]) {
    let m = rows.len();
    for (w, o) in ws.iter().zip(out.chunks_exact_mut(m.max(1))) {
        for (x, d) in rows.iter().zip(o.iter_mut()) {
            *d = dot(x, w);
        }
    }
}

/// `sum_l x[l] * w[l]` with [`LANES`] independent partial sums.
#[inline(always)]
pub(crate) fn dot<T: Real>(x: &[T], w: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let (xc, wc) = (x.chunks_exact(LANES), w.chunks_exact(LANES));
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (xs, ws) in xc.zip(wc) {
        let (xs, ws): (&[T; LANES], &[T; LANES]) = match (xs.try_into(), ws.try_into()) {
            (Ok(a), Ok(b)) => (a, b),
            _ => unreachable!("chunks_exact yields LANES elements"),
        };
        for l in 0..LANES {
            acc[l] = acc[l] + xs[l] * ws[l];
        }
    }
    let mut s = T::ZERO;
    for (a, b) in xr.iter().zip(wr) {
        s = s + *a * *b;
    }
    // Pairwise, so that the lanes add as a tree.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] = acc[l] + acc[l + width];
        }
    }
    acc[0] + s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::raw::gemm::gemm_into;
    use crate::kernels::cpu::raw::gemm::Mat;

    #[test]
    fn equals_the_general_product_for_every_row_count_and_remainder() {
        for (m, k, n) in [(1, 16, 1), (3, 37, 70), (16, 576, 130), (32, 100, 64), (7, 129, 65)] {
            let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 13) as f64 - 6.0) / 5.0).collect();
            let w: Vec<f64> = (0..n * k).map(|i| ((i * 5 % 11) as f64 - 5.0) / 3.0).collect();
            let am = Mat::dense(&a, m, k);
            let bm = Mat::dense(&w, n, k).t();
            assert!(applies(&am, &bm));
            for accumulate in [false, true] {
                let init: Vec<f64> = (0..m * n).map(|i| i as f64 * 0.25).collect();
                let (mut got, mut want) = (init.clone(), init.clone());
                few_rows_into(&mut got, accumulate, &am, &bm);
                for i in 0..m {
                    for j in 0..n {
                        let p: f64 = (0..k).map(|l| a[i * k + l] * w[j * k + l]).sum();
                        want[i * n + j] = if accumulate { init[i * n + j] + p } else { p };
                    }
                }
                for (x, y) in got.iter().zip(&want) {
                    assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "{m}x{k}x{n}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn applies_only_to_few_rows_against_a_transposed_row_major_weight() {
        let a = vec![0f32; 33 * 64];
        let w = vec![0f32; 10 * 64];
        let wt = Mat::dense(&w, 10, 64).t();
        assert!(applies(&Mat::dense(&a[..32 * 64], 32, 64), &wt));
        assert!(!applies(&Mat::dense(&a, 33, 64), &wt), "too many rows");
        assert!(
            !applies(&Mat::dense(&a[..64 * 10], 64, 10), &Mat::dense(&w, 10, 64)),
            "b row-major"
        );
    }

    /// The f32 path (AVX-512 blocks of 4 x 4 where the CPU has them): rows and weight rows that
    /// are not multiples of 4, a length with a masked tail, against the f64 product.
    #[test]
    fn f32_blocks_and_tails_agree_with_the_f64_product() {
        for (m, k, n) in [
            (7, 100, 70),
            (16, 576, 9),
            (1, 17, 3),
            (4, 16, 4),
            (2, 33, 5),
            (6, 64, 7),
        ] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 9) as f32 * 0.1 - 0.3).collect();
            let wv: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.2 - 0.5).collect();
            let (xm, wm) = (Mat::dense(&x, m, k), Mat::dense(&wv, n, k).t());
            let (mut fast, mut general) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
            few_rows_into(&mut fast, false, &xm, &wm);
            gemm_into(&mut general, false, &xm, &wm);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| x[i * k + l] as f64 * wv[j * k + l] as f64).sum();
                    let got = fast[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{k}x{n} ({i}, {j}): {got} vs {want}"
                    );
                    assert!((got - general[i * n + j] as f64).abs() <= 1e-4 * (1.0 + want.abs()));
                }
            }
        }
    }
}
