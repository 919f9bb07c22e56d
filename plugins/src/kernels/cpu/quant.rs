//! Block-quantized GGML weights (Q4_0, Q4_1, Q8_0) multiplied on the CPU with f32 or f64
//! activations, without ever holding the whole weight in floats.
//!
//! A weight `W [n, k]` is stored in blocks of 32 consecutive elements of a row, each block one
//! scale `d`, one offset `m` and 32 small integer codes `q`: element `= d q + m` (Q4_1: 4-bit
//! `q`, `m` stored; Q4_0: 4-bit `q`, `m = -8 d`; Q8_0: 8-bit signed `q`, `m = 0`). The GGML
//! blocks are unpacked once into [`BlockWeight`] (codes, scales and offsets in separate arrays,
//! scales and offsets widened to f32).
//!
//! `y = x W^T` runs tile by tile: a tile of weight rows is dequantized into a buffer that
//! stays in the core's cache (exactly the values candle's `dequantize` gives) and multiplied
//! there, by dot products when `x` has few rows (decoding: the weight is read once, ~6x fewer
//! bytes than f32) and by `gemm` otherwise (a batched teacher forward). Tiles are spread over
//! the rayon pool. Against candle's `QMatMul`, the activations are not rounded to 8 bits: the
//! result is the dequantized model's, up to the order of the sums.
//!
//! [`QuantMatMul`] is the candle op (its backward, `dx = dy W`, runs the same way through
//! [`QuantMatMulT`]; the weight is frozen and gets no gradient). CPU only by design; a
//! quantized weight on a GPU runs through candle's CUDA `QMatMul`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

use super::fastmath::Real;
use super::few_rows::{dots_into, FEW_ROWS};
#[cfg(target_arch = "x86_64")]
use super::raw::avx512_dispatch;
use super::raw::gemm::{gemm_into_on, Mat};
use super::raw::{as_f32, as_f32_mut};
use super::rows::{by_dtype, slice};

/// Elements per block (every format here).
pub const BLOCK: usize = 32;

/// Weight rows a task of the few-rows product dequantizes at a time (they stay in L1).
const SUB_TILE: usize = 8;
/// Weight rows per task of the many-rows product (and of the backward).
const COL_TILE: usize = 64;
/// Weight rows per task of the few-rows product: small, so that the short projections of a
/// decoding step (192 rows for a key/value head group) still split evenly over the pool.
const FEW_ROWS_TILE: usize = 16;
/// Activation rows per task of the many-rows product.
const ROW_CHUNK: usize = 256;
/// Activation rows up to which f32 products multiply the codes directly ([`fused_dots`])
/// instead of dequantizing tiles: one or a few decoding streams, where unpacking dominates.
const FUSED_ROWS: usize = 2;

/// How a block's codes are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codes {
    /// 16 bytes: byte `i` holds element `i` in its low nibble and `i + 16` in its high one.
    Nibbles,
    /// 32 signed bytes, one per element.
    Bytes,
}

impl Codes {
    fn bytes_per_block(self) -> usize {
        match self {
            Codes::Nibbles => BLOCK / 2,
            Codes::Bytes => BLOCK,
        }
    }
}

/// A `[rows, cols]` block-quantized weight unpacked for the CPU products.
#[derive(Debug, Clone)]
pub struct BlockWeight {
    rows: usize,
    cols: usize,
    codes: Codes,
    /// `d` per block, `[rows * cols / 32]`, in GGML's half precision (widened in the kernels:
    /// every byte saved is one fewer to stream per decoded token).
    scale: Vec<f16>,
    /// `m` per block (empty for [`Codes::Bytes`], whose offset is 0).
    offset: Vec<f16>,
    /// The codes, `bytes_per_block` per block, blocks in row-major order.
    quants: Vec<u8>,
}

impl BlockWeight {
    /// The weight of a CPU `QTensor` of shape `[rows, cols]`, or `None` when its format is not
    /// one of Q4_0, Q4_1, Q8_0 (or it is not a matrix, or lives on another device).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Ok((rows, cols)) = q.shape().dims2() else {
            return Ok(None);
        };
        if !q.device().is_cpu() || !supported(q.dtype()) {
            return Ok(None);
        }
        Ok(Self::from_ggml(q.dtype(), &q.data()?, rows, cols))
    }

    /// The weight from GGML's raw blocks of `dtype`, or `None` when the format is not
    /// supported or `raw` does not hold `rows x cols` elements of it.
    pub fn from_ggml(dtype: GgmlDType, raw: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !supported(dtype)
            || cols == 0
            || !cols.is_multiple_of(BLOCK)
            || raw.len() != rows * cols / BLOCK * dtype.type_size()
        {
            return None;
        }
        let codes = if dtype == GgmlDType::Q8_0 {
            Codes::Bytes
        } else {
            Codes::Nibbles
        };
        let blocks = rows * cols / BLOCK;
        let mut w = BlockWeight {
            rows,
            cols,
            codes,
            scale: Vec::with_capacity(blocks),
            offset: Vec::with_capacity(if codes == Codes::Nibbles { blocks } else { 0 }),
            quants: Vec::with_capacity(blocks * codes.bytes_per_block()),
        };
        let half_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]);
        for b in raw.chunks_exact(dtype.type_size()) {
            let d = half_at(b, 0);
            w.scale.push(d);
            match dtype {
                GgmlDType::Q4_0 => {
                    // -8 d is exact in half precision unless it overflows
                    let m = f16::from_f32(-8.0 * d.to_f32());
                    if m.is_infinite() && d.is_finite() {
                        return None;
                    }
                    w.offset.push(m);
                    w.quants.extend_from_slice(&b[2..]);
                }
                GgmlDType::Q4_1 => {
                    w.offset.push(half_at(b, 2));
                    w.quants.extend_from_slice(&b[4..]);
                }
                _ => w.quants.extend_from_slice(&b[2..]),
            }
        }
        Some(w)
    }

    /// `[rows, cols]`: output features by input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held (codes, scales and offsets).
    pub fn bytes(&self) -> usize {
        self.quants.len() + 2 * (self.scale.len() + self.offset.len())
    }

    /// Rows `rows` of the weight as floats, row-major into `out` (`rows.len() * cols`).
    pub fn dequantize_into<T: Real>(&self, rows: Range<usize>, out: &mut [T]) {
        assert!(
            rows.end <= self.rows && out.len() == rows.len() * self.cols,
            "dequantize_into: shapes"
        );
        if let Some(out) = as_f32_mut(out) {
            return dequantize_f32(self, rows, out);
        }
        let mut tmp = vec![0f32; out.len()];
        dequantize_f32(self, rows, &mut tmp);
        for (o, v) in out.iter_mut().zip(tmp) {
            *o = T::from_f64(v as f64);
        }
    }

    /// `x [m, cols] @ W^T`: `[m, rows]`, row-major.
    ///
    /// # Panics
    /// When `x` does not hold `m * cols` elements.
    pub fn matmul_t<T: Real>(&self, x: &[T], m: usize) -> Vec<T> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "quantized matmul: x shape");
        if m <= FUSED_ROWS {
            if let Some(out) = self.fused_matmul_t(x, m) {
                return out;
            }
        }
        let (chunk, tile) = if m <= FEW_ROWS {
            (m.max(1), FEW_ROWS_TILE)
        } else {
            (ROW_CHUNK, COL_TILE)
        };
        let tasks: Vec<(Range<usize>, Range<usize>)> = ranges(m, chunk)
            .flat_map(|r| ranges(n, tile).map(move |c| (r.clone(), c)))
            .collect();
        let blocks: Vec<Vec<T>> = tasks
            .par_iter()
            .map_init(Vec::new, |buf, (r, c)| {
                self.product_block(&x[r.start * k..r.end * k], c.clone(), buf)
            })
            .collect();
        let mut out = vec![T::ZERO; m * n];
        for ((r, c), block) in tasks.iter().zip(&blocks) {
            for (i, row) in r.clone().zip(block.chunks_exact(c.len())) {
                out[i * n + c.start..i * n + c.end].copy_from_slice(row);
            }
        }
        out
    }

    /// `g [m, rows] @ W`: `[m, cols]`, row-major (the gradient of [`Self::matmul_t`] w.r.t. `x`).
    ///
    /// # Panics
    /// When `g` does not hold `m * rows` elements.
    pub fn matmul<T: Real>(&self, g: &[T], m: usize) -> Vec<T> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(g.len(), m * n, "quantized matmul: gradient shape");
        let mut out = vec![T::ZERO; m * k];
        out.par_chunks_mut(ROW_CHUNK.min(m.max(1)) * k)
            .zip(g.par_chunks(ROW_CHUNK.min(m.max(1)) * n))
            .for_each(|(o, gr)| {
                let mr = gr.len() / n.max(1);
                let mut buf = Vec::new();
                for c in ranges(n, COL_TILE) {
                    buf.resize(c.len() * k, T::ZERO);
                    self.dequantize_into(c.clone(), &mut buf);
                    let a = Mat::strided(gr, c.start, (mr, c.len()), (n, 1)).expect("rows of g");
                    gemm_into_on(o, true, &a, &Mat::dense(&buf, c.len(), k), 1);
                }
            });
        out
    }

    /// [`Self::matmul_t`] straight from the codes for f32 `x` of at most `FUSED_ROWS` rows
    /// (`None` for f64 or without AVX-512): tiles of weight rows over the pool, each writing its
    /// `[tile, m]` block of the transposed product in place.
    fn fused_matmul_t<T: Real>(&self, x: &[T], m: usize) -> Option<Vec<T>> {
        let x = as_f32(x)?;
        let sums = block_sums(x);
        let mut out = vec![T::ZERO; m * self.rows];
        let mut t = vec![0f32; if m == 1 { 0 } else { m * self.rows }];
        let target = if m == 1 { as_f32_mut(&mut out)? } else { &mut t[..] };
        let done = target
            .par_chunks_mut(FEW_ROWS_TILE * m.max(1))
            .enumerate()
            .all(|(i, o)| fused_dots(self, x, &sums, i * FEW_ROWS_TILE..i * FEW_ROWS_TILE + o.len() / m, o));
        if !done {
            return None;
        }
        if m > 1 {
            let o = as_f32_mut(&mut out)?;
            for (j, row) in t.chunks_exact(m).enumerate() {
                for (i, v) in row.iter().enumerate() {
                    o[i * self.rows + j] = *v;
                }
            }
        }
        Some(out)
    }

    /// `x [mr, cols] @ W[cols_range]^T` as a row-major `[mr, c.len()]` block; `buf` is the
    /// task's scratch for dequantized rows.
    fn product_block<T: Real>(&self, x: &[T], c: Range<usize>, buf: &mut Vec<T>) -> Vec<T> {
        let k = self.cols;
        let mr = x.len() / k;
        let mut out = vec![T::ZERO; mr * c.len()];
        if mr > FEW_ROWS {
            buf.resize(c.len() * k, T::ZERO);
            self.dequantize_into(c.clone(), buf);
            let w = Mat::dense(buf, c.len(), k);
            gemm_into_on(&mut out, false, &Mat::dense(x, mr, k), &w.t(), 1);
            return out;
        }
        let xs: Vec<&[T]> = x.chunks_exact(k).collect();
        let mut dots = vec![T::ZERO; SUB_TILE * mr];
        for s in ranges(c.end - c.start, SUB_TILE) {
            let rows = c.start + s.start..c.start + s.end;
            buf.resize(rows.len() * k, T::ZERO);
            self.dequantize_into(rows, buf);
            let ws: Vec<&[T]> = buf.chunks_exact(k).collect();
            dots_into(&xs, &ws, &mut dots[..ws.len() * mr]);
            for (j, col) in dots.chunks_exact(mr).take(ws.len()).enumerate() {
                for (i, v) in col.iter().enumerate() {
                    out[i * c.len() + s.start + j] = *v;
                }
            }
        }
        out
    }
}

/// The sums of `x`'s consecutive blocks of 32 (the factors of the offsets in [`fused_dots`]).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(BLOCK).map(|b| b.iter().sum()).collect()
}

/// Whether [`BlockWeight`] unpacks `dtype`.
pub fn supported(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// `0..len` in consecutive ranges of `size` (the last one shorter).
fn ranges(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> + Clone {
    (0..len).step_by(size.max(1)).map(move |s| s..(s + size).min(len))
}

#[cfg(target_arch = "x86_64")]
avx512_dispatch!(fn dequantize_f32(w: &BlockWeight, rows: Range<usize>, out: &mut [f32]) => dequantize_rows_avx512, else dequantize_rows);
#[cfg(not(target_arch = "x86_64"))]
use dequantize_rows as dequantize_f32;

#[cfg(target_arch = "x86_64")]
avx512_dispatch!(fn fused_dots(w: &BlockWeight, x: &[f32], sums: &[f32], c: Range<usize>, out: &mut [f32]) -> bool => fused_dots_avx512, else no_fused_dots);
#[cfg(not(target_arch = "x86_64"))]
use no_fused_dots as fused_dots;

/// Without AVX-512 the few-rows product dequantizes tiles: nothing done, `false`.
fn no_fused_dots(_: &BlockWeight, _: &[f32], _: &[f32], _: Range<usize>, _: &mut [f32]) -> bool {
    false
}

/// `out [c.len(), mr] = (x [mr, cols] @ W[c]^T)^T` straight from the codes
/// (`raw::avx512::block_dots`), for `mr` in `1..=FUSED_ROWS`, given the [`block_sums`] of `x`;
/// `true` when done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn fused_dots_avx512(w: &BlockWeight, x: &[f32], sums: &[f32], c: Range<usize>, out: &mut [f32]) -> bool {
    let k = w.cols;
    let xs: Vec<&[f32]> = x.chunks_exact(k).collect();
    let ss: Vec<&[f32]> = sums.chunks_exact(k / BLOCK).collect();
    match xs.len() {
        1 => fused_rows::<1>(w, [xs[0]], [ss[0]], c, out),
        2 => fused_rows::<2>(w, [xs[0], xs[1]], [ss[0], ss[1]], c, out),
        _ => return false,
    }
    true
}

/// [`fused_dots_avx512`] for `R` activation rows with their per-block sums `ss`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn fused_rows<const R: usize>(w: &BlockWeight, xs: [&[f32]; R], ss: [&[f32]; R], c: Range<usize>, out: &mut [f32]) {
    use super::raw::avx512::block_dots;
    let nb = w.cols / BLOCK;
    let bpb = w.codes.bytes_per_block();
    for (j, row) in c.enumerate() {
        let blocks = row * nb..(row + 1) * nb;
        let (q, d) = (
            &w.quants[blocks.start * bpb..blocks.end * bpb],
            &w.scale[blocks.clone()],
        );
        let sums = match w.codes {
            Codes::Nibbles => block_dots::<R, false>(q, d, &w.offset[blocks], xs, ss),
            Codes::Bytes => block_dots::<R, true>(q, d, &[], xs, ss),
        };
        out[j * R..(j + 1) * R].copy_from_slice(&sums);
    }
}

/// [`dequantize_rows`] with the AVX-512 unpacking of `raw::avx512`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn dequantize_rows_avx512(w: &BlockWeight, rows: Range<usize>, out: &mut [f32]) {
    use super::raw::avx512::{dequantize_bytes, dequantize_nibbles};
    let per_row = w.cols / BLOCK;
    let blocks = rows.start * per_row..rows.end * per_row;
    let bpb = w.codes.bytes_per_block();
    let q = &w.quants[blocks.start * bpb..blocks.end * bpb];
    match w.codes {
        Codes::Nibbles => dequantize_nibbles(q, &w.scale[blocks.clone()], &w.offset[blocks], out),
        Codes::Bytes => dequantize_bytes(q, &w.scale[blocks], out),
    }
}

/// Rows `rows` of `w` into `out`: `d q + m` per element, the arithmetic of GGML's (and
/// candle's) dequantization (Q4_0's `(q - 8) d` equals `q d + (-8 d)` exactly: both products
/// and their difference are representable).
#[inline(always)]
fn dequantize_rows(w: &BlockWeight, rows: Range<usize>, out: &mut [f32]) {
    let per_row = w.cols / BLOCK;
    let bpb = w.codes.bytes_per_block();
    let blocks = rows.start * per_row..rows.end * per_row;
    let quants = w.quants[blocks.start * bpb..blocks.end * bpb].chunks_exact(bpb);
    let outs = out.chunks_exact_mut(BLOCK);
    match w.codes {
        Codes::Nibbles => {
            let (d, m) = (&w.scale[blocks.clone()], &w.offset[blocks]);
            for (((o, q), d), m) in outs.zip(quants).zip(d).zip(m) {
                let (lo, hi) = o.split_at_mut(BLOCK / 2);
                let (d, m) = (d.to_f32(), m.to_f32());
                for i in 0..BLOCK / 2 {
                    lo[i] = (q[i] & 0x0F) as f32 * d + m;
                    hi[i] = (q[i] >> 4) as f32 * d + m;
                }
            }
        }
        Codes::Bytes => {
            for ((o, q), d) in outs.zip(quants).zip(&w.scale[blocks]) {
                for i in 0..BLOCK {
                    o[i] = q[i] as i8 as f32 * d.to_f32();
                }
            }
        }
    }
}

/// `x [.., cols] @ W^T` on the CPU (the op of a quantized linear layer).
#[derive(Debug, Clone)]
pub struct QuantMatMul(pub Arc<BlockWeight>);

/// `g [.., rows] @ W` (the backward of [`QuantMatMul`]).
struct QuantMatMulT(Arc<BlockWeight>);

impl QuantMatMul {
    /// `x @ W^T` for `x [.., cols]` of f32 or f64 on the CPU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }
}

/// Rows of a `[.., width]` layout whose last dim must be `width`.
fn rows_of(l: &Layout, width: usize, what: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&w) if w == width => Ok(l.shape().elem_count() / width.max(1)),
        _ => bail!("{what}: expected [.., {width}], got {:?}", l.dims()),
    }
}

/// The op's CPU body: `f(w, x, rows)` on the contiguous input, the last dim becoming `out`.
fn run(
    s: &CpuStorage,
    l: &Layout,
    (inp, out): (usize, usize),
    what: &str,
    f32_op: impl FnOnce(&[f32], usize) -> Vec<f32>,
    f64_op: impl FnOnce(&[f64], usize) -> Vec<f64>,
) -> Result<(CpuStorage, Shape)> {
    let m = rows_of(l, inp, what)?;
    let shape = super::rows::with_last(l.shape(), out);
    by_dtype(
        what,
        &[s],
        || Ok((f32::storage(f32_op(slice(s, l, what)?, m)), shape.clone())),
        || Ok((f64::storage(f64_op(slice(s, l, what)?, m)), shape.clone())),
    )
}

impl CustomOp1 for QuantMatMul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        let w = &self.0;
        run(
            s,
            l,
            (k, n),
            "quantized matmul",
            |x, m| w.matmul_t(x, m),
            |x, m| w.matmul_t(x, m),
        )
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&QuantMatMulT(self.0.clone()))?))
    }
}

impl CustomOp1 for QuantMatMulT {
    fn name(&self) -> &'static str {
        "quantized-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        let w = &self.0;
        run(
            s,
            l,
            (n, k),
            "quantized matmul backward",
            |g, m| w.matmul(g, m),
            |g, m| w.matmul(g, m),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// A `[rows, cols]` weight quantized to `dtype` by candle, with its dequantized copy.
    fn quantized(dtype: GgmlDType, rows: usize, cols: usize) -> (QTensor, Tensor) {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0 + (i % 7) as f32 * 0.01)
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).expect("weight");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        let deq = q.dequantize(&Device::Cpu).expect("dequantize");
        (q, deq)
    }

    fn close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
        let diff = (got.to_dtype(DType::F64).expect("f64") - want.to_dtype(DType::F64).expect("f64"))
            .expect("diff")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f64>()
            .expect("scalar");
        assert!(diff <= tol, "{what}: max difference {diff}");
    }

    #[test]
    fn dequantizes_exactly_as_candle_does() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, deq) = quantized(dtype, 5, 96);
            let w = BlockWeight::from_qtensor(&q).expect("read").expect("supported");
            let mut got = vec![0f32; 3 * 96];
            w.dequantize_into(1..4, &mut got);
            let want: Vec<f32> = deq
                .narrow(0, 1, 3)
                .expect("rows")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("vec");
            assert_eq!(got, want, "{dtype:?}");
            let mut generic = vec![0f32; 3 * 96];
            dequantize_rows(&w, 1..4, &mut generic);
            assert_eq!(generic, want, "{dtype:?}: the loop without AVX-512");
        }
    }

    #[test]
    fn other_formats_are_left_to_candle() {
        let t = Tensor::ones((4, 256), DType::F32, &Device::Cpu).expect("t");
        for dtype in [GgmlDType::F32, GgmlDType::F16, GgmlDType::Q4K, GgmlDType::Q6K] {
            let q = QTensor::quantize(&t, dtype).expect("quantize");
            assert!(BlockWeight::from_qtensor(&q).expect("read").is_none(), "{dtype:?}");
        }
        assert!(
            BlockWeight::from_ggml(GgmlDType::Q8_0, &[0; 33], 1, 32).is_none(),
            "short data"
        );
        let mut q4_0 = f16::from_f32(10000.0).to_le_bytes().to_vec();
        q4_0.extend([0x88; 16]);
        assert!(
            BlockWeight::from_ggml(GgmlDType::Q4_0, &q4_0, 1, 32).is_none(),
            "a Q4_0 scale whose offset -8 d overflows half precision"
        );
        q4_0[..2].copy_from_slice(&f16::from_f32(1000.0).to_le_bytes());
        assert!(BlockWeight::from_ggml(GgmlDType::Q4_0, &q4_0, 1, 32).is_some());
    }

    /// Every row count of the three strategies (codes multiplied directly up to 4 rows in f32,
    /// dot products up to 32 rows, `gemm` tiles above, with partial tiles on both axes; odd and
    /// even block counts, more than 16 blocks a row), f32 and f64, against the dequantized
    /// product in f64.
    #[test]
    fn the_product_equals_the_dequantized_product() {
        let shapes = [
            (GgmlDType::Q4_0, 150, 96),
            (GgmlDType::Q4_1, 150, 96),
            (GgmlDType::Q8_0, 150, 96),
        ];
        let wide = [(GgmlDType::Q4_1, 40, 640), (GgmlDType::Q8_0, 40, 640)];
        for (dtype, rows, cols) in shapes.into_iter().chain(wide) {
            let (q, deq) = quantized(dtype, rows, cols);
            let op = QuantMatMul(Arc::new(
                BlockWeight::from_qtensor(&q).expect("read").expect("supported"),
            ));
            for m in [1, 2, 3, 4, 5, 16, 32, 33, 300] {
                let x = Tensor::randn(0f64, 1.0, (m, cols), &Device::Cpu).expect("x");
                let want = x
                    .matmul(&deq.to_dtype(DType::F64).expect("f64").t().expect("t"))
                    .expect("want");
                close(
                    &op.forward(&x).expect("f64 product"),
                    &want,
                    1e-10,
                    &format!("{dtype:?} f64 m={m}"),
                );
                let x32 = x.to_dtype(DType::F32).expect("f32");
                close(
                    &op.forward(&x32).expect("f32 product"),
                    &want,
                    1e-4,
                    &format!("{dtype:?} f32 m={m}"),
                );
            }
        }
    }

    /// The gradient w.r.t. `x` against the dense layer's, and by central differences in f64.
    #[test]
    fn the_input_gradient_equals_the_dense_layers_and_finite_differences() {
        let (q, deq) = quantized(GgmlDType::Q4_1, 70, 64);
        let deq = deq.to_dtype(DType::F64).expect("f64");
        let op = QuantMatMul(Arc::new(
            BlockWeight::from_qtensor(&q).expect("read").expect("supported"),
        ));
        let dy = Tensor::randn(0f64, 1.0, (2, 5, 70), &Device::Cpu).expect("dy");
        let x = Var::randn(0f64, 1.0, (2, 5, 64), &Device::Cpu).expect("x");
        let loss = |x: &Tensor| {
            (op.forward(x).expect("fwd") * &dy)
                .expect("mul")
                .sum_all()
                .expect("sum")
        };
        let got = loss(x.as_tensor())
            .backward()
            .expect("backward")
            .get(x.as_tensor())
            .cloned()
            .expect("grad");
        let dense = x.as_tensor().broadcast_matmul(&deq.t().expect("t")).expect("dense");
        let want = (dense * &dy)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward");
        close(
            &got,
            want.get(x.as_tensor()).expect("grad"),
            1e-10,
            "against the dense layer",
        );
        let (h, flat) = (
            1e-6,
            x.as_tensor()
                .flatten_all()
                .expect("flat")
                .to_vec1::<f64>()
                .expect("vec"),
        );
        let g = got.flatten_all().expect("flat").to_vec1::<f64>().expect("vec");
        for i in [0, 17, 333, 639] {
            let at = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                let t = Tensor::from_vec(v, (2, 5, 64), &Device::Cpu).expect("x");
                loss(&t).to_scalar::<f64>().expect("loss")
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()), "x[{i}]: {fd} vs {}", g[i]);
        }
    }
}
