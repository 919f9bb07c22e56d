//! Matrix products on the `gemm` crate (the library candle's own CPU matmul uses, with its
//! AVX-512 kernels turned on in the workspace), over strided views whose bounds are checked
//! when the view is made, so that the raw-pointer call inside [`gemm_into`] stays in them.

use crate::kernels::cpu::fastmath::Real;

/// A strided 2-D view of a slice: element `(i, j)` is `data[offset + i * rs + j * cs]`, and
/// every such element lies inside `data` (checked by the constructors: the invariant the
/// product relies on).
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Real> Mat<'a, T> {
    /// The `[rows, cols]` view with row stride `rs` and column stride `cs` from `offset`, or
    /// `None` when an element it covers would lie past the end of `data`.
    pub fn strided(
        data: &'a [T],
        offset: usize,
        (rows, cols): (usize, usize),
        (rs, cs): (usize, usize),
    ) -> Option<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)
                .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
                .and_then(|x| x.checked_add(offset))?;
            if last >= data.len() {
                return None;
            }
        }
        Some(Mat {
            data,
            offset,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A row-major contiguous `[rows, cols]` matrix over `data`.
    ///
    /// # Panics
    /// When `data` does not hold exactly `rows * cols` elements.
    pub fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix size");
        Mat {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(&self) -> Self {
        Mat {
            data: self.data,
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Distance between rows.
    pub fn row_stride(&self) -> usize {
        self.rs
    }

    /// Distance between columns.
    pub fn col_stride(&self) -> usize {
        self.cs
    }

    /// Row `i` as a slice.
    ///
    /// # Panics
    /// When the columns are not contiguous (`col_stride() != 1`) or `i` is out of range.
    pub fn row(&self, i: usize) -> &'a [T] {
        assert!(self.cs == 1 && i < self.rows, "Mat::row: not a contiguous row");
        let start = self.offset + i * self.rs;
        &self.data[start..start + self.cols]
    }

    /// Column `j` as a slice.
    ///
    /// # Panics
    /// When the rows are not contiguous (`row_stride() != 1`) or `j` is out of range.
    pub fn col(&self, j: usize) -> &'a [T] {
        assert!(self.rs == 1 && j < self.cols, "Mat::col: not a contiguous column");
        let start = self.offset + j * self.cs;
        &self.data[start..start + self.rows]
    }

    /// Element `(i, j)`.
    ///
    /// # Panics
    /// When `(i, j)` is out of range.
    pub fn at(&self, i: usize, j: usize) -> T {
        assert!(i < self.rows && j < self.cols, "Mat::at: ({i}, {j}) out of range");
        self.data[self.offset + i * self.rs + j * self.cs]
    }

    /// The same view as `Mat<f32>` when `T` is `f32`.
    pub fn as_f32(&self) -> Option<Mat<'a, f32>> {
        Some(Mat {
            data: super::as_f32(self.data)?,
            offset: self.offset,
            rows: self.rows,
            cols: self.cols,
            rs: self.rs,
            cs: self.cs,
        })
    }

    /// Rows `start..start + len` as a view.
    ///
    /// # Panics
    /// When the range passes the last row.
    pub fn row_range(&self, start: usize, len: usize) -> Self {
        assert!(start + len <= self.rows, "Mat::row_range: past the last row");
        Mat {
            offset: self.offset + start * self.rs,
            rows: len,
            ..*self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// `dst [m, n] = (dst if accumulate) + a [m, k] @ b [k, n]` into a row-major slice, spread over
/// the rayon pool by `gemm`. With `accumulate = false` `dst` is only written, so it may hold
/// anything on entry (the products write outputs from [`super::output_vec`]).
///
/// # Panics
/// When the inner dims differ or `dst` does not hold `m * n` elements.
pub fn gemm_into<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>) {
    gemm_into_on(dst, accumulate, a, b, rayon::current_num_threads())
}

/// [`gemm_into`] on at most `threads` threads of the rayon pool (1: on the calling thread, for
/// products that are themselves one task of a parallel loop).
pub fn gemm_into_on<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>, threads: usize) {
    assert!(a.cols == b.rows && dst.len() == a.rows * b.cols, "gemm_into: shapes");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::ZERO);
        }
        return;
    }
    if crate::kernels::cpu::few_rows::applies(a, b) {
        // A few rows against a transposed weight: dot products, the weight read in place.
        return crate::kernels::cpu::few_rows::few_rows_into(dst, accumulate, a, b);
    }
    if let Some(rows) = row_block(m, n, threads) {
        return by_row_blocks(dst, accumulate, a, b, rows);
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the constructors of `Mat` checked that every element the strides reach lies
    // inside `data`; `dst` holds m * n elements with row stride n; `gemm` does not read `dst`
    // when `read_dst` is false (`dst := beta * a b` then).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Output rows at most per block in [`by_row_blocks`] (a block's output and left operand stay
/// in the core's L2 while `gemm` sweeps them).
const MAX_BLOCK_ROWS: usize = 1024;

/// Rows per block when a product on `threads` threads is split into row blocks of its output
/// (`None`: one `gemm` call spreading the work itself).
///
/// Measured on two cores (`docs/performance.md`, session 25): `gemm`'s own split ran the LM
/// head's `dW += G^T h` (`[49152, 256] x [256, 576]`) at 206-218 GFLOP/s and `dh = G W`
/// (`[256, 49152] x [49152, 576]`) at 225-227, even row blocks (one single-threaded call
/// each) at 267-288 and 252-261; the linear layers' shapes gained 0-13%. Outputs much wider
/// than tall (the logits `[256, 49152]`) lost ~10% that way, so they keep `gemm`'s split, as
/// do products too short to give every thread 64 rows.
fn row_block(m: usize, n: usize, threads: usize) -> Option<usize> {
    if threads < 2 || m < 64 * threads || n > 16 * m {
        return None;
    }
    let blocks = m.div_ceil(MAX_BLOCK_ROWS).max(threads).next_multiple_of(threads);
    Some(m.div_ceil(blocks).next_multiple_of(16))
}

/// The product by blocks of `rows` output rows, each block one single-threaded `gemm` call on
/// the rayon pool.
fn by_row_blocks<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>, rows: usize) {
    use rayon::prelude::*;
    let n = b.cols;
    dst.par_chunks_mut(rows * n).enumerate().for_each(|(i, block)| {
        gemm_into_on(block, accumulate, &a.row_range(i * rows, block.len() / n), b, 1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product that overwrites its output must not read it: a NaN-poisoned destination
    /// (NaN * 0 is NaN, so any read would show) gives the exact product.
    #[test]
    fn overwriting_product_never_reads_the_destination() {
        let (m, k, n) = (70, 33, 41);
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32) - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32) - 2.0).collect();
        let (am, bm) = (Mat::dense(&a, m, k), Mat::dense(&b, k, n));
        let mut dst = vec![f32::NAN; m * n];
        gemm_into(&mut dst, false, &am, &bm);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
                assert_eq!(dst[i * n + j], want, "({i}, {j})");
            }
        }
    }

    /// The row-block split (taken for tall products on more than one thread) gives the
    /// product of one call: overwriting and accumulating, with a transposed (column-major)
    /// left operand and a row count that does not divide into the blocks.
    #[test]
    fn row_blocks_give_the_whole_product() {
        let (m, k, n) = (2 * MAX_BLOCK_ROWS + 77, 19, 23);
        let rows = row_block(m, n, 2).expect("a tall product is split");
        assert!(rows <= MAX_BLOCK_ROWS && m.div_ceil(rows) >= 2);
        assert_eq!(row_block(256, 49_152, 2), None, "wide outputs keep gemm's split");
        assert_eq!(row_block(100, 8, 2), None, "fewer than 64 rows per thread");
        assert_eq!(row_block(m, n, 1), None);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7 % 11) as f64) - 5.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 5 % 13) as f64) - 6.0).collect();
        let at = Mat::dense(&a, k, m).t(); // [m, k], column-major
        let bm = Mat::dense(&b, k, n);
        let want = |i: usize, j: usize| (0..k).map(|l| a[l * m + i] * b[l * n + j]).sum::<f64>();
        let mut dst = vec![f64::NAN; m * n];
        by_row_blocks(&mut dst, false, &at, &bm, rows);
        let mut acc = vec![1.0; m * n];
        by_row_blocks(&mut acc, true, &at, &bm, rows);
        for i in 0..m {
            for j in 0..n {
                assert_eq!(dst[i * n + j], want(i, j), "({i}, {j})");
                assert_eq!(acc[i * n + j], want(i, j) + 1.0, "({i}, {j}) accumulated");
            }
        }
    }

    #[test]
    fn strided_views_past_their_storage_are_refused() {
        let data = [0f64; 12];
        assert!(Mat::strided(&data, 0, (3, 4), (4, 1)).is_some());
        assert!(Mat::strided(&data, 1, (3, 4), (4, 1)).is_none());
        assert!(Mat::strided(&data, 0, (4, 3), (1, 4)).is_some());
        assert!(Mat::strided(&data, 0, (2, 7), (1, 2)).is_none());
        assert!(Mat::strided(&data, 99, (0, 4), (4, 1)).is_some());
    }
}
