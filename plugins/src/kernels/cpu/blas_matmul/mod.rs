//! Matrix multiply through a system BLAS (`cblas_sgemm` / `cblas_dgemm`, OpenBLAS from Debian's
//! `libopenblas-dev`), as a candle `CustomOp2` with a real backward. Only built with the
//! `blas` feature (off by default and in CI: the default build needs nothing from apt).
//!
//! `C = A B` for `A [.., M, K]`, `B [.., K, N]` with the same batch dims (rank 2 or more, no
//! broadcasting). Each operand may be row-major contiguous or the transpose of its last two
//! dims (as `x.t()` of a contiguous `x`): BLAS reads both layouts in place, so `q k^T` and
//! `x W^T` copy nothing. Anything else is made contiguous first.
//!
//! Backward: `dA = dC B^T`, `dB = A^T dC`, through the same op (the transposes are views).
//!
//! Threads: OpenBLAS is told to run single-threaded and the op spreads its work over the rayon
//! pool itself (row blocks of `C` for one matrix, whole matrices for a batch), so BLAS's own
//! pthreads never compete with rayon and candle for the cores. candle's own CPU matmul uses
//! the `gemm` crate, whose AVX-512 microkernels need a nightly compiler (it runs AVX2 ones);
//! OpenBLAS picks its AVX-512 kernels at run time (docs/performance.md has the comparison).

#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::blas::{single_threaded, Blas};
use crate::kernels::Support;

/// Where the BLAS matmul runs: the CPU only.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// How one operand `[batch.., rows, cols]` lies in memory.
#[derive(Debug, Clone, Copy)]
struct Operand {
    /// Stored as the transpose (`[cols, rows]` row-major per matrix).
    trans: bool,
    rows: usize,
    cols: usize,
}

impl Operand {
    /// `Some` when `dims`/`stride` describe a packed batch of row-major or transposed
    /// matrices (a dim of size 1 may have any stride).
    fn of(dims: &[usize], stride: &[usize]) -> Option<Self> {
        let r = dims.len();
        if r < 2 {
            return None;
        }
        let (rows, cols) = (dims[r - 2], dims[r - 1]);
        let fits = |s_rows: usize, s_cols: usize| {
            (rows <= 1 || stride[r - 2] == s_rows) && (cols <= 1 || stride[r - 1] == s_cols)
        };
        let trans = if fits(cols, 1) {
            false
        } else if fits(1, rows) {
            true
        } else {
            return None;
        };
        let mut expect = rows * cols;
        for i in (0..r - 2).rev() {
            if dims[i] > 1 && stride[i] != expect {
                return None;
            }
            expect *= dims[i];
        }
        Some(Operand { trans, rows, cols })
    }

    /// Leading dim of the stored matrix.
    fn ld(&self) -> usize {
        if self.trans {
            self.rows
        } else {
            self.cols
        }
    }
}

/// `a @ b` through BLAS, with a backward through BLAS. `a [.., M, K]`, `b [.., K, N]` with the
/// same leading dims, where [`supports`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() < 2 || ad.len() != bd.len() || ad[..ad.len() - 2] != bd[..bd.len() - 2] {
        bail!("blas matmul: expected [.., M, K] @ [.., K, N] with equal batch dims, got {ad:?} @ {bd:?}")
    }
    if ad[ad.len() - 1] != bd[bd.len() - 2] {
        bail!("blas matmul: inner dims differ: {ad:?} @ {bd:?}")
    }
    let packed = |t: &Tensor| -> Result<Tensor> {
        if Operand::of(t.dims(), t.stride()).is_some() {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    packed(a)?.apply_op2(&packed(b)?, MatMul)
}

/// Whether [`matmul`] can take `a @ b`: CPU tensors of the same f32/f64 dtype, rank >= 2,
/// equal batch dims.
pub fn supports(a: &Tensor, b: &Tensor) -> bool {
    let (ad, bd) = (a.dims(), b.dims());
    SUPPORT.admits_together(a, &[b])
        && ad.len() >= 2
        && ad.len() == bd.len()
        && ad[..ad.len() - 2] == bd[..bd.len() - 2]
}

struct MatMul;

fn fwd_typed<T: Blas>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    single_threaded();
    let (Some(oa), Some(ob)) = (Operand::of(l1.dims(), l1.stride()), Operand::of(l2.dims(), l2.stride())) else {
        bail!("blas matmul: operands must be packed row-major or transposed matrices")
    };
    let a = whole::<T>(s1, l1)?;
    let b = whole::<T>(s2, l2)?;
    let (m, k, n) = (oa.rows, oa.cols, ob.cols);
    let batch: usize = l1.dims()[..l1.dims().len() - 2].iter().product();
    let mut out = vec![T::ZERO; batch * m * n];
    let mut dims = l1.dims().to_vec();
    let r = dims.len();
    dims[r - 1] = n;
    if m == 0 || n == 0 || k == 0 {
        return Ok((T::storage(out), Shape::from(dims)));
    }
    let (sa, sb) = (m * k, k * n);
    let threads = rayon::current_num_threads().max(1);
    if batch >= threads || m < 32 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, c)| {
            T::gemm(
                oa.trans,
                ob.trans,
                m,
                n,
                k,
                &a[i * sa..(i + 1) * sa],
                oa.ld(),
                &b[i * sb..(i + 1) * sb],
                ob.ld(),
                c,
            )
        });
    } else {
        // Few large matrices: split each into row blocks of C (rows of op(A)).
        let block = m.div_ceil(threads).max(16);
        for i in 0..batch {
            let (ai, bi) = (&a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb]);
            out[i * m * n..(i + 1) * m * n]
                .par_chunks_mut(block * n)
                .enumerate()
                .for_each(|(j, c)| {
                    let r0 = j * block;
                    let rows = c.len() / n;
                    // Rows r0.. of op(A): row-major starts at row r0; transposed at column r0.
                    let a_off = if oa.trans { r0 } else { r0 * oa.ld() };
                    T::gemm(oa.trans, ob.trans, rows, n, k, &ai[a_off..], oa.ld(), bi, ob.ld(), c)
                });
        }
    }
    Ok((T::storage(out), Shape::from(dims)))
}

/// The storage of a packed layout from its start offset to its end.
fn whole<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some(v) = T::slice(s) else {
        bail!("blas matmul: expected {:?}, got {:?}", T::DTYPE, s.dtype())
    };
    let start = l.start_offset();
    let end = start + l.shape().elem_count();
    if end > v.len() {
        bail!("blas matmul: layout past the end of its storage")
    }
    Ok(&v[start..end])
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => fwd_typed::<f32>(s1, l1, s2, l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => fwd_typed::<f64>(s1, l1, s2, l2),
            _ => bail!("blas matmul: expected two f32 or two f64 tensors"),
        }
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _c: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach();
        let da = matmul(&g, &b.detach().t()?)?;
        let db = matmul(&a.detach().t()?, &g)?;
        Ok((Some(da), Some(db)))
    }
}
