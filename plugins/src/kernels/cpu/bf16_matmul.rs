//! Matrix products in bf16 with f32 sums on the CPU: a frozen weight kept in bf16 (the
//! projections of a teacher asked for `precision = "bf16"`, half the memory of f32 weights) and
//! the products of f32 operands rounded per call ([`bf16_gemm_into`]: the linear layers of a
//! bf16 student, `kernels::cpu::linear`'s `Products::Bf16`, and its head in the fused LM-head
//! loss).
//!
//! `y = bf16(x) W^T`, every product of two bf16 values exact in f32 and the sums in f32 (what
//! PyTorch's bf16 autocast and oneDNN do). On CPUs with Intel AMX (Sapphire Rapids and later)
//! the products run on the tile unit ([`super::raw::amx`], `TDPBF16PS`, ~4-8x the f32 FMA rate of the
//! AVX-512 units) with the right operand packed into the tiles' layout ([`Bf16Weight`]: once for
//! a frozen weight, per call otherwise). Elsewhere the same values are multiplied by `gemm` in
//! f32 (the packed weight widened per call). Both ways give the same products up to the order of
//! the f32 sums.
//!
//! [`Bf16MatMul`] is the candle op of a frozen weight; its backward (`dx = dy W`, the weight gets
//! no gradient) runs in f32 through `gemm` on the widened weight.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::raw::amx;
use super::raw::gemm::{gemm_into, Mat};
use super::raw::output_vec;
use super::rows::{slice, with_last};

/// Output columns per packed tile.
const TILE_COLS: usize = 16;
/// Inputs per packed tile (pairs of bf16 in 16 rows).
const TILE_K: usize = 32;
/// bf16 elements per packed tile.
const TILE_ELEMS: usize = TILE_COLS * TILE_K;
/// Rows are padded to this (the tile products' row block).
const ROW_BLOCK: usize = 32;
/// Output columns are padded to this (the tile products' column block).
const COL_BLOCK: usize = 32;

/// Whether the bf16 products run on the AMX tiles here (else on `gemm` in f32, at the speed of
/// f32 products).
pub fn tiles_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `f32 -> bf16` bits, rounding to nearest even (NaN stays NaN), as `VCVTNEPS2BF16` does.
#[inline]
pub fn to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    let quiet_nan = (u >> 16) | 0x40;
    // A select, not a branch: loops of it vectorise.
    (if u & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// bf16 bits -> the f32 of the same value.
pub fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// The right operand of bf16 products, rounded to bf16 and packed in the layout of the tile
/// products: a `[n, k]` weight `W` of `x W^T` (`n` padded to a multiple of 32 and `k` to a
/// multiple of 32 with zeros). A frozen weight is packed once; a trainable one per product.
#[derive(Debug)]
pub struct Bf16Weight {
    n: usize,
    k: usize,
    n_pad: usize,
    k_pad: usize,
    /// The tiles of one input tile together (else those of one column tile): the order the
    /// source is read fastest in (`raw::amx::TileOrder`).
    by_inputs: bool,
    tiles: Vec<u16>,
}

impl Bf16Weight {
    /// Packs the row-major `[n, k]` f32 weight `w` (each value rounded to bf16).
    ///
    /// # Panics
    /// When `w` does not hold `n * k` values.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack_mat(&Mat::dense(w, n, k).t())
    }

    /// Packs `b [k, n]`, the right operand of the products `a b` (so `W = b^T`), of any strides
    /// (reading contiguous rows or columns of `b` as slices where it has them).
    pub fn pack_mat(b: &Mat<f32>) -> Self {
        let (k, n) = (b.rows(), b.cols());
        if b.row_stride() == 1 {
            // A column of `b` (a row of `W`) is contiguous: by column tiles, a pair of inputs
            // per tile row.
            return Self::pack_with(n, k, |col, panel| {
                let c = col % TILE_COLS;
                for (p, pair) in b.col(col).chunks(2).enumerate() {
                    let at = pair_offset(2 * p) + 2 * c;
                    panel[at] = to_bf16_bits(pair[0]);
                    panel[at + 1] = pair.get(1).map_or(0, |&v| to_bf16_bits(v));
                }
            });
        }
        if b.col_stride() != 1 {
            return Self::pack_with(n, k, |col, panel| {
                for input in 0..k {
                    panel[pair_offset(input) + 2 * (col % TILE_COLS)] = to_bf16_bits(b.at(input, col));
                }
            });
        }
        // A row of `b` is contiguous: by input tiles, two rows' 16 columns per tile row.
        let mut packed = Self::zeroed(n, k, true);
        let row_len = (packed.n_pad / TILE_COLS * TILE_ELEMS).max(1);
        packed.tiles.par_chunks_mut(row_len).enumerate().for_each(|(t, tiles)| {
            for input in (t * TILE_K..((t + 1) * TILE_K).min(k)).step_by(2) {
                let even = b.row(input);
                let odd = (input + 1 < k).then(|| b.row(input + 1));
                let at = pair_offset(input % TILE_K);
                for (j, tile) in tiles.chunks_exact_mut(TILE_ELEMS).enumerate() {
                    let cols = (j * TILE_COLS).min(n)..((j + 1) * TILE_COLS).min(n);
                    let row = &mut tile[at..at + 2 * TILE_COLS];
                    for (d, &v) in row.iter_mut().step_by(2).zip(&even[cols.clone()]) {
                        *d = to_bf16_bits(v);
                    }
                    if let Some(odd) = odd {
                        for (d, &v) in row.iter_mut().skip(1).step_by(2).zip(&odd[cols]) {
                            *d = to_bf16_bits(v);
                        }
                    }
                }
            }
        });
        packed
    }

    /// Both packings of a row-major `[n, k]` weight `w` in one pass over it: `(for x W^T, for
    /// g W)`, i.e. `pack_mat(w^T)` and `pack_mat(w)` (the fused LM-head loss's head, whose
    /// `h W^T` and `G W` both multiply in bf16).
    pub fn pack_both(w: &[f32], n: usize, k: usize) -> (Self, Self) {
        assert_eq!(w.len(), n * k, "bf16 weight: shape");
        let (mut fwd, mut bwd) = (Self::zeroed(n, k, false), Self::zeroed(k, n, true));
        // Block `r`: rows 32 r.. of `w`, which are column tiles 2 r, 2 r + 1 of `fwd` and input
        // tile `r` of `bwd`.
        let fwd_block = (2 * fwd.k_pad / TILE_K * TILE_ELEMS).max(1);
        let bwd_block = (bwd.n_pad / TILE_COLS * TILE_ELEMS).max(1);
        fwd.tiles
            .par_chunks_mut(fwd_block)
            .zip(bwd.tiles.par_chunks_mut(bwd_block))
            .enumerate()
            .for_each_init(Vec::new, |bits: &mut Vec<u16>, (r, (fwd_panels, bwd_tiles))| {
                for row in (r * ROW_BLOCK..((r + 1) * ROW_BLOCK).min(n)).filter(|_| k > 0) {
                    bits.clear();
                    bits.extend(w[row * k..(row + 1) * k].iter().map(|&v| to_bf16_bits(v)));
                    let in_block = row % ROW_BLOCK;
                    let panel = &mut fwd_panels[(in_block / TILE_COLS) * (fwd_block / 2)..];
                    let column = 2 * (in_block % TILE_COLS);
                    for (p, pair) in bits.chunks(2).enumerate() {
                        let at = pair_offset(2 * p) + column;
                        panel[at] = pair[0];
                        panel[at + 1] = pair.get(1).copied().unwrap_or(0);
                    }
                    let at = pair_offset(in_block);
                    for (j, tile) in bwd_tiles.chunks_exact_mut(TILE_ELEMS).enumerate() {
                        let cols = (j * TILE_COLS).min(k)..((j + 1) * TILE_COLS).min(k);
                        for (d, &b) in tile[at..].iter_mut().step_by(2).zip(&bits[cols]) {
                            *d = b;
                        }
                    }
                }
            });
        (fwd, bwd)
    }

    /// All zeros, for a `[n, k]` weight.
    fn zeroed(n: usize, k: usize, by_inputs: bool) -> Self {
        let (n_pad, k_pad) = (n.div_ceil(COL_BLOCK) * COL_BLOCK, k.div_ceil(TILE_K) * TILE_K);
        Bf16Weight {
            n,
            k,
            n_pad,
            k_pad,
            by_inputs,
            tiles: vec![0u16; n_pad * k_pad],
        }
    }

    /// Offset of tile `(j, t)` (column tile `j`, input tile `t`).
    fn tile_at(&self, j: usize, t: usize) -> usize {
        if self.by_inputs {
            (t * (self.n_pad / TILE_COLS) + j) * TILE_ELEMS
        } else {
            (j * (self.k_pad / TILE_K) + t) * TILE_ELEMS
        }
    }

    /// Packs a `[n, k]` tensor: bf16 as it is, any other float dtype read as f32 and rounded.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let flat = w.flatten_all()?;
        if w.dtype() == DType::BF16 {
            let values = flat.to_vec1::<half::bf16>()?;
            return Ok(Self::pack_with(n, k, |col, panel| {
                for (input, v) in values[col * k..(col + 1) * k].iter().enumerate() {
                    panel[pair_offset(input) + 2 * (col % TILE_COLS)] = v.to_bits();
                }
            }));
        }
        let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self::pack(&values, n, k))
    }

    /// Packs the `[n, k]` weight by column tiles: `fill(col, panel)` writes column `col` into
    /// its column tile's panel (at [`pair_offset`] `+ 2 (col % 16)`).
    fn pack_with(n: usize, k: usize, fill: impl Fn(usize, &mut [u16]) + Sync) -> Self {
        let mut packed = Self::zeroed(n, k, false);
        let panel_len = (packed.k_pad / TILE_K * TILE_ELEMS).max(1);
        packed
            .tiles
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(col_tile, panel)| {
                let first = col_tile * TILE_COLS;
                for col in first..(first + TILE_COLS).min(n) {
                    fill(col, panel);
                }
            });
        packed
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight as row-major `[n, k]` f32 (its bf16 values, exactly).
    pub fn widen(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(col, row)| {
            for (input, v) in row.iter_mut().enumerate() {
                let tile = self.tile_at(col / TILE_COLS, input / TILE_K);
                *v = from_bf16_bits(self.tiles[tile + pair_offset(input % TILE_K) + 2 * (col % TILE_COLS)]);
            }
        });
        out
    }

    /// `y [m, n] = bf16(x) W^T` for row-major `x [m, k]`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "bf16 matmul: x shape");
        let mut y = output_vec(m * self.n);
        self.product_into(&mut y, false, &Mat::dense(x, m, self.k));
        y
    }

    /// `out [m, n] (+)= bf16(a) W^T` for `a [m, k]` of any strides (added onto `out` when
    /// `accumulate`, else `out` is only written): on the AMX tiles where the CPU has them, else
    /// through `gemm` on the rounded `a` and the widened weight.
    ///
    /// # Panics
    /// When `a` does not have `k` columns or `out` does not hold `m * n` values.
    pub fn product_into(&self, out: &mut [f32], accumulate: bool, a: &Mat<f32>) {
        assert!(
            a.cols() == self.k && out.len() == a.rows() * self.n,
            "bf16 product: a [{}, {}], W [{}, {}], out {}",
            a.rows(),
            a.cols(),
            self.n,
            self.k,
            out.len()
        );
        if a.rows() == 0 || self.n == 0 {
            return;
        }
        if self.k == 0 {
            if !accumulate {
                out.fill(0.0);
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            return self.product_into_tiles(out, accumulate, a);
        }
        self.product_into_widened(out, accumulate, a)
    }

    /// [`Self::product_into`] through `gemm`: `a` rounded to bf16, the weight widened.
    pub fn product_into_widened(&self, out: &mut [f32], accumulate: bool, a: &Mat<f32>) {
        let m = a.rows();
        let mut rounded = output_vec(m * self.k);
        rounded.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(i, row)| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = from_bf16_bits(to_bf16_bits(a.at(i, j)));
            }
        });
        let w = self.widen();
        let w = Mat::dense(&w, self.n, self.k);
        gemm_into(out, accumulate, &Mat::dense(&rounded, m, self.k), &w.t());
    }

    /// [`Self::product_into`] on the AMX tiles: one task per block of rows over the pool, each
    /// rounding its rows into a padded bf16 buffer and summing straight into `out` (or, where
    /// `m` or `n` is not a multiple of 32, into a padded copy of its rows).
    #[cfg(target_arch = "x86_64")]
    fn product_into_tiles(&self, out: &mut [f32], accumulate: bool, a: &Mat<f32>) {
        let (m, n, n_pad, k_pad) = (a.rows(), self.n, self.n_pad, self.k_pad);
        let task_rows = task_rows(m, k_pad);
        let direct = n == n_pad && m.is_multiple_of(ROW_BLOCK);
        out.par_chunks_mut(task_rows * n).enumerate().for_each_init(
            || (Vec::new(), Vec::new()),
            |(buf, staged): &mut (Vec<u16>, Vec<f32>), (task, rows_out)| {
                let (first, rows) = (task * task_rows, rows_out.len() / n);
                let rows_pad = rows.next_multiple_of(ROW_BLOCK);
                round_rows(a, first, rows, k_pad, buf);
                let tiles = (&self.tiles[..], self.tile_order());
                if direct {
                    return amx::product_rows(buf, k_pad, tiles, n_pad, rows_out, accumulate);
                }
                staged.clear();
                staged.resize(rows_pad * n_pad, 0.0);
                if accumulate {
                    for (s, o) in staged.chunks_exact_mut(n_pad).zip(rows_out.chunks_exact(n)) {
                        s[..n].copy_from_slice(o);
                    }
                }
                amx::product_rows(buf, k_pad, tiles, n_pad, staged, accumulate);
                for (o, s) in rows_out.chunks_exact_mut(n).zip(staged.chunks_exact(n_pad)) {
                    o.copy_from_slice(&s[..n]);
                }
            },
        );
    }

    /// The order of the tiles, for the tile products.
    #[cfg(target_arch = "x86_64")]
    fn tile_order(&self) -> amx::TileOrder {
        if self.by_inputs {
            amx::TileOrder::ByInputs
        } else {
            amx::TileOrder::ByColumns
        }
    }

    /// `dx [m, k] = g W` for `g [m, n]` (the backward of [`Self::matmul_t`]), in f32 through
    /// `gemm` on the widened weight.
    pub fn matmul(&self, g: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(g.len(), m * self.n, "bf16 matmul: gradient shape");
        let w = self.widen();
        let mut dx = vec![0f32; m * self.k];
        gemm_into(
            &mut dx,
            false,
            &Mat::dense(g, m, self.n),
            &Mat::dense(&w, self.n, self.k),
        );
        dx
    }
}

/// `out [m, n] (+)= bf16(a) bf16(b)` for f32 `a [m, k]` and `b [k, n]` of any strides: every
/// product of two bf16 values exact, the sums in f32 (see the module doc). `b` is packed first
/// (`O(k n)`, against the product's `O(m k n)`).
pub fn bf16_gemm_into(out: &mut [f32], accumulate: bool, a: &Mat<f32>, b: &Mat<f32>) {
    assert_eq!(a.cols(), b.rows(), "bf16 product: inner dims");
    Bf16Weight::pack_mat(b).product_into(out, accumulate, a)
}

/// The tile products' L2 budget for one task's rounded rows (a pass of up to 2,048 inputs).
const TASK_ROW_BYTES: usize = 512 << 10;

/// Rows per task of a tile product with `m` rows of `k_pad` inputs: the rows split evenly over
/// the pool's threads, in multiples of 32, and at most what keeps one pass's rounded rows in
/// [`TASK_ROW_BYTES`].
fn task_rows(m: usize, k_pad: usize) -> usize {
    let per_pass = k_pad.min(2048) * 2;
    let cap = (TASK_ROW_BYTES / per_pass / ROW_BLOCK).max(1) * ROW_BLOCK;
    m.div_ceil(rayon::current_num_threads().max(1))
        .next_multiple_of(ROW_BLOCK)
        .min(cap)
}

/// Rows `first..first + rows` of `a`, rounded to bf16, into `buf` as `[rows rounded up to 32,
/// k_pad]` (the padding zero).
fn round_rows(a: &Mat<f32>, first: usize, rows: usize, k_pad: usize, buf: &mut Vec<u16>) {
    let k = a.cols();
    buf.clear();
    buf.resize(rows.next_multiple_of(ROW_BLOCK) * k_pad, 0);
    if a.col_stride() == 1 {
        for (r, dst) in buf.chunks_exact_mut(k_pad).take(rows).enumerate() {
            for (d, &v) in dst.iter_mut().zip(a.row(first + r)) {
                *d = to_bf16_bits(v);
            }
        }
        return;
    }
    if a.row_stride() == 1 {
        // Columns contiguous (a transposed operand): walk down them.
        for j in 0..k {
            for (r, &v) in a.col(j)[first..first + rows].iter().enumerate() {
                buf[r * k_pad + j] = to_bf16_bits(v);
            }
        }
        return;
    }
    for r in 0..rows {
        for j in 0..k {
            buf[r * k_pad + j] = to_bf16_bits(a.at(first + r, j));
        }
    }
}

/// Offset in a column tile's panel of input `input` of the panel's first column (column `c` of
/// the tile is `2 c` further): tile `input / 32`, row `(input % 32) / 2`, half `input % 2`.
fn pair_offset(input: usize) -> usize {
    let (t, pair) = (input / TILE_K, input % TILE_K);
    t * TILE_ELEMS + (pair / 2) * 2 * TILE_COLS + pair % 2
}

/// `x [.., k] @ W^T` on the CPU for f32 `x` (the op of a bf16 frozen linear layer).
#[derive(Debug, Clone)]
pub struct Bf16MatMul(pub Arc<Bf16Weight>);

/// `g [.., n] @ W` (the backward of [`Bf16MatMul`]).
struct Bf16MatMulT(Arc<Bf16Weight>);

impl Bf16MatMul {
    /// `x @ W^T` for f32 `x [.., k]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

/// The ops' CPU body: `f(x, rows)` on the contiguous f32 input `[.., inp]`, the last dim
/// becoming `out`.
fn run(
    s: &CpuStorage,
    l: &Layout,
    (inp, out): (usize, usize),
    what: &str,
    f: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<f32>(s, l, what)?;
    match l.dims().last() {
        Some(&w) if w == inp => {}
        _ => bail!("{what}: expected [.., {inp}], got {:?}", l.dims()),
    }
    let rows = x.len() / inp.max(1);
    Ok((CpuStorage::F32(f(x, rows)), with_last(l.shape(), out)))
}

impl CustomOp1 for Bf16MatMul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        run(s, l, (k, n), "bf16 matmul", |x, m| self.0.matmul_t(x, m))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&Bf16MatMulT(self.0.clone()))?))
    }
}

impl CustomOp1 for Bf16MatMulT {
    fn name(&self) -> &'static str {
        "bf16-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        run(s, l, (n, k), "bf16 matmul backward", |g, m| self.0.matmul(g, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 31) % 1013) as f32 / 500.0 - 1.0 + (i % 3) as f32 * 1e-3)
            .collect()
    }

    fn round(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| from_bf16_bits(to_bf16_bits(x)) as f64).collect()
    }

    /// `round(x) round(W)^T` in f64.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let (x, w) = (round(x), round(w));
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        y
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols * rows).map(|i| v[(i % rows) * cols + i / rows]).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn rounding_matches_the_half_crate() {
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            -f32::INFINITY,
        ];
        let spread = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)));
        for v in specials.into_iter().chain(spread) {
            let want = half::bf16::from_f32(v);
            if v.is_nan() {
                assert!(from_bf16_bits(to_bf16_bits(v)).is_nan(), "{v:e}");
            } else {
                assert_eq!(to_bf16_bits(v), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn packing_keeps_every_value() {
        let (n, k) = (37, 45);
        let w = values(n * k, 1);
        let packed = Bf16Weight::pack(&w, n, k);
        assert_eq!((packed.n_pad, packed.k_pad), (64, 64));
        assert_eq!(packed.widen().iter().map(|&v| v as f64).collect::<Vec<_>>(), round(&w));
    }

    #[test]
    fn a_bf16_tensor_is_packed_as_it_is() -> Result<()> {
        let (n, k) = (20, 33);
        let w = Tensor::from_vec(values(n * k, 8), (n, k), &Device::Cpu)?;
        let from_bf16 = Bf16Weight::from_tensor(&w.to_dtype(DType::BF16)?)?;
        assert_eq!(from_bf16.tiles, Bf16Weight::from_tensor(&w)?.tiles);
        Ok(())
    }

    /// Every way of the product into a fresh buffer, `(what, out)`.
    fn all_ways(packed: &Bf16Weight, a: &Mat<f32>, init: &[f32], accumulate: bool) -> Vec<(&'static str, Vec<f32>)> {
        let mut ways = vec![];
        let mut out = init.to_vec();
        packed.product_into_widened(&mut out, accumulate, a);
        ways.push(("widened", out));
        let mut out = init.to_vec();
        packed.product_into(&mut out, accumulate, a);
        ways.push(("dispatched", out));
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            let mut out = init.to_vec();
            packed.product_into_tiles(&mut out, accumulate, a);
            ways.push(("tiles", out));
        }
        ways
    }

    #[test]
    fn every_way_of_the_product_matches_the_f64_reference_on_odd_shapes() {
        // (m, n, k): padded and exact shapes, one row, and k over one pass of the tiles.
        for (m, n, k) in [(1, 1, 1), (33, 70, 45), (64, 32, 32), (130, 17, 200), (96, 64, 2100)] {
            let (x, w) = (values(m * k, 2), values(n * k, 3));
            let packed = Bf16Weight::pack(&w, n, k);
            let want = reference(&x, &w, m, n, k);
            assert_close(&packed.matmul_t(&x, m), &want, "matmul_t");
            for (what, got) in all_ways(&packed, &Mat::dense(&x, m, k), &vec![f32::NAN; m * n], false) {
                assert_close(&got, &want, what);
            }
        }
    }

    #[test]
    fn products_of_strided_operands_accumulate_onto_the_output() {
        // `out += bf16(a) bf16(b)` with `a` and `b` both read transposed, as `dW = G^T h` does.
        for (m, n, k) in [(40, 33, 70), (64, 64, 96), (3, 96, 2080)] {
            let (at, bt) = (values(k * m, 4), values(n * k, 5));
            let (a, b) = (Mat::dense(&at, k, m).t(), Mat::dense(&bt, n, k).t());
            let init = values(m * n, 6);
            let mut want = reference(&transpose(&at, k, m), &bt, m, n, k);
            for (w, &i) in want.iter_mut().zip(&init) {
                *w += i as f64;
            }
            // `b` read by columns (a transposed view) and by rows (a row-major copy): the two
            // orders of the tiles.
            let b_rows = transpose(&bt, n, k);
            for packed in [
                Bf16Weight::pack_mat(&b),
                Bf16Weight::pack_mat(&Mat::dense(&b_rows, k, n)),
            ] {
                assert_eq!(packed.widen(), Bf16Weight::pack_mat(&b).widen());
                for (what, got) in all_ways(&packed, &a, &init, true) {
                    assert_close(&got, &want, what);
                }
            }
            let mut out = init.clone();
            bf16_gemm_into(&mut out, true, &a, &b);
            assert_close(&out, &want, "bf16_gemm_into");
        }
    }

    #[test]
    fn packing_both_ways_at_once_is_packing_each_way() {
        for (n, k) in [(70, 45), (64, 96), (3, 1), (33, 32)] {
            let w = values(n * k, 9);
            let (fwd, bwd) = Bf16Weight::pack_both(&w, n, k);
            let wm = Mat::dense(&w, n, k);
            let (want_fwd, want_bwd) = (Bf16Weight::pack_mat(&wm.t()), Bf16Weight::pack_mat(&wm));
            assert_eq!(fwd.tiles, want_fwd.tiles, "{n} x {k}: x W^T");
            assert_eq!(
                (bwd.tiles == want_bwd.tiles, bwd.by_inputs),
                (true, true),
                "{n} x {k}: g W"
            );
        }
    }

    #[test]
    fn an_empty_inner_dim_gives_zeros_or_leaves_the_sum() {
        let (a, b) = (Mat::dense(&[], 3, 0), Mat::dense(&[], 0, 2));
        let mut out = vec![f32::NAN; 6];
        bf16_gemm_into(&mut out, false, &a, &b);
        assert_eq!(out, vec![0.0; 6]);
        let mut out = vec![1.5; 6];
        bf16_gemm_into(&mut out, true, &a, &b);
        assert_eq!(out, vec![1.5; 6]);
    }

    #[test]
    fn the_op_gives_the_input_its_gradient() -> Result<()> {
        let (m, n, k) = (5, 40, 33);
        let w = values(n * k, 4);
        let op = Bf16MatMul(Arc::new(Bf16Weight::pack(&w, n, k)));
        let x = Var::from_vec(values(m * k, 5), (m, k), &Device::Cpu)?;
        let g = Tensor::from_vec(values(m * n, 6), (m, n), &Device::Cpu)?;
        let y = op.forward(x.as_tensor())?;
        assert_eq!(y.dims(), [m, n]);
        let grads = (y * &g)?.sum_all()?.backward()?;
        let dx = grads.get(&x).expect("dx").flatten_all()?.to_vec1::<f32>()?;
        let (g, w) = (g.flatten_all()?.to_vec1::<f32>()?, round(&w));
        for i in 0..m {
            for t in 0..k {
                let want: f64 = (0..n).map(|j| g[i * n + j] as f64 * w[j * k + t]).sum();
                assert!((dx[i * k + t] as f64 - want).abs() < 1e-4, "dx[{i},{t}]");
            }
        }
        Ok(())
    }

    #[test]
    fn f64_inputs_are_refused() -> Result<()> {
        let op = Bf16MatMul(Arc::new(Bf16Weight::pack(&values(4, 7), 2, 2)));
        let x = Tensor::zeros((3, 2), DType::F64, &Device::Cpu)?;
        let err = op.forward(&x).expect_err("f64").to_string();
        assert!(err.contains("bf16 matmul") && err.contains("F32"), "{err}");
        Ok(())
    }
}
