//! A frozen weight kept in bf16 and multiplied in bf16 with f32 sums on the CPU: the matrix
//! products of a teacher asked for `precision = "bf16"` (half the memory of f32 weights).
//!
//! `y = bf16(x) W^T`, every product of a bf16 activation and a bf16 weight exact in f32 and the
//! sums in f32 (what PyTorch's bf16 autocast and oneDNN do). On CPUs with Intel AMX (Sapphire
//! Rapids and later) the products run on the tile unit ([`raw::amx`], `TDPBF16PS`, ~4-8x the f32
//! FMA rate of the AVX-512 units); the weight is packed once into the tiles' layout. Elsewhere
//! the same values are multiplied by `gemm` in f32 (the packed weight widened per call: the
//! speed of an f32 weight, the memory of a bf16 one). Both ways give the same products up to
//! the order of the f32 sums.
//!
//! [`Bf16MatMul`] is the candle op; its backward (`dx = dy W`, the weight gets no gradient) runs
//! in f32 through `gemm` on the widened weight.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::raw::amx;
use super::raw::gemm::{gemm_into, Mat};
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

/// `f32 -> bf16` bits, rounding to nearest even (NaN stays NaN), as `VCVTNEPS2BF16` does.
pub fn to_bf16_bits(v: f32) -> u16 {
    let u = v.to_bits();
    if v.is_nan() {
        ((u >> 16) | 0x40) as u16
    } else {
        (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
    }
}

/// bf16 bits -> the f32 of the same value.
pub fn from_bf16_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A frozen `[n, k]` weight in bf16, packed in the layout of the tile products (`n` padded to
/// a multiple of 32 and `k` to a multiple of 32 with zeros).
#[derive(Debug)]
pub struct Bf16Weight {
    n: usize,
    k: usize,
    n_pad: usize,
    k_pad: usize,
    tiles: Vec<u16>,
}

impl Bf16Weight {
    /// Packs the row-major `[n, k]` f32 weight `w` (each value rounded to bf16).
    ///
    /// # Panics
    /// When `w` does not hold `n * k` values.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "bf16 weight: shape");
        Self::pack_with(n, k, |i| to_bf16_bits(w[i]))
    }

    /// Packs a `[n, k]` tensor: bf16 as it is, any other float dtype read as f32 and rounded.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let flat = w.flatten_all()?;
        if w.dtype() == DType::BF16 {
            let values = flat.to_vec1::<half::bf16>()?;
            return Ok(Self::pack_with(n, k, |i| values[i].to_bits()));
        }
        let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(Self::pack(&values, n, k))
    }

    /// Packs the weight whose element `i` (row-major `[n, k]`) has the bf16 bits `bits(i)`.
    fn pack_with(n: usize, k: usize, bits: impl Fn(usize) -> u16 + Sync) -> Self {
        let (n_pad, k_pad) = (n.div_ceil(COL_BLOCK) * COL_BLOCK, k.div_ceil(TILE_K) * TILE_K);
        let k_tiles = k_pad / TILE_K;
        let mut tiles = vec![0u16; n_pad * k_pad];
        tiles
            .par_chunks_mut(k_tiles * TILE_ELEMS)
            .enumerate()
            .for_each(|(col_tile, panel)| {
                for (i, v) in panel.iter_mut().enumerate() {
                    let (col, input) = tile_position(col_tile, i);
                    if col < n && input < k {
                        *v = bits(col * k + input);
                    }
                }
            });
        Bf16Weight {
            n,
            k,
            n_pad,
            k_pad,
            tiles,
        }
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The weight as row-major `[n, k]` f32 (its bf16 values, exactly).
    pub fn widen(&self) -> Vec<f32> {
        let k_tiles = self.k_pad / TILE_K;
        let mut out = vec![0f32; self.n * self.k];
        out.par_chunks_mut(self.k.max(1)).enumerate().for_each(|(col, row)| {
            let panel = &self.tiles[(col / TILE_COLS) * k_tiles * TILE_ELEMS..];
            for (input, v) in row.iter_mut().enumerate() {
                let (t, pair) = (input / TILE_K, input % TILE_K);
                *v = from_bf16_bits(
                    panel[t * TILE_ELEMS + (pair / 2) * 2 * TILE_COLS + (col % TILE_COLS) * 2 + pair % 2],
                );
            }
        });
        out
    }

    /// `y [m, n] = bf16(x) W^T` for `x [m, k]`: on the AMX tiles where the CPU has them, else
    /// through `gemm` on the widened weight.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "bf16 matmul: x shape");
        #[cfg(target_arch = "x86_64")]
        if amx::available() {
            return self.matmul_t_tiles(x, m);
        }
        self.matmul_t_widened(x, m)
    }

    /// [`Self::matmul_t`] through `gemm`: `x` rounded to bf16, the weight widened.
    pub fn matmul_t_widened(&self, x: &[f32], m: usize) -> Vec<f32> {
        let rounded: Vec<f32> = x.par_iter().map(|&v| from_bf16_bits(to_bf16_bits(v))).collect();
        let w = self.widen();
        let mut y = vec![0f32; m * self.n];
        let w = Mat::dense(&w, self.n, self.k);
        gemm_into(&mut y, false, &Mat::dense(&rounded, m, self.k), &w.t());
        y
    }

    /// [`Self::matmul_t`] on the AMX tiles: tasks of 64 rows over the pool, each rounding its
    /// rows into a padded bf16 buffer and writing a padded block of the output.
    #[cfg(target_arch = "x86_64")]
    fn matmul_t_tiles(&self, x: &[f32], m: usize) -> Vec<f32> {
        const TASK_ROWS: usize = 2 * ROW_BLOCK;
        let (k, k_pad, n_pad) = (self.k, self.k_pad, self.n_pad);
        let m_pad = m.div_ceil(ROW_BLOCK) * ROW_BLOCK;
        let mut y = vec![0f32; m_pad * n_pad];
        y.par_chunks_mut(TASK_ROWS * n_pad)
            .enumerate()
            .for_each_init(Vec::new, |buf: &mut Vec<u16>, (task, out)| {
                let rows = out.len() / n_pad;
                buf.clear();
                buf.resize(rows * k_pad, 0);
                let first = task * TASK_ROWS;
                for (r, dst) in buf.chunks_exact_mut(k_pad).enumerate().take(m.saturating_sub(first)) {
                    let src = &x[(first + r) * k..(first + r + 1) * k];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d = to_bf16_bits(v);
                    }
                }
                amx::product_rows(buf, k_pad, &self.tiles, n_pad, out);
            });
        if m_pad == m && n_pad == self.n {
            return y;
        }
        let mut out = vec![0f32; m * self.n];
        out.par_chunks_mut(self.n.max(1))
            .zip(y.par_chunks(n_pad))
            .for_each(|(o, row)| o.copy_from_slice(&row[..self.n]));
        out
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

/// `(output column, input)` of element `i` of column tile `col_tile`'s packed panel.
fn tile_position(col_tile: usize, i: usize) -> (usize, usize) {
    let (t, in_tile) = (i / TILE_ELEMS, i % TILE_ELEMS);
    let (row, in_row) = (in_tile / (2 * TILE_COLS), in_tile % (2 * TILE_COLS));
    (col_tile * TILE_COLS + in_row / 2, t * TILE_K + 2 * row + in_row % 2)
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

    #[test]
    fn both_ways_of_the_product_match_the_f64_reference_on_odd_shapes() {
        for (m, n, k) in [(1, 1, 1), (33, 70, 45), (64, 32, 32), (130, 17, 200)] {
            let (x, w) = (values(m * k, 2), values(n * k, 3));
            let packed = Bf16Weight::pack(&w, n, k);
            let want = reference(&x, &w, m, n, k);
            assert_close(&packed.matmul_t_widened(&x, m), &want, "widened");
            assert_close(&packed.matmul_t(&x, m), &want, "dispatched");
            #[cfg(target_arch = "x86_64")]
            if amx::available() {
                assert_close(&packed.matmul_t_tiles(&x, m), &want, "tiles");
            }
        }
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
