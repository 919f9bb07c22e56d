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

use std::sync::Once;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::Real;

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

// The CBLAS interface of OpenBLAS (LP64: `blasint` is a C `int`).
#[allow(unsafe_code)] // FFI declarations; every call site states why it is sound.
#[link(name = "openblas")]
extern "C" {
    fn cblas_sgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f32,
        a: *const f32,
        lda: i32,
        b: *const f32,
        ldb: i32,
        beta: f32,
        c: *mut f32,
        ldc: i32,
    );
    fn cblas_dgemm(
        order: i32,
        trans_a: i32,
        trans_b: i32,
        m: i32,
        n: i32,
        k: i32,
        alpha: f64,
        a: *const f64,
        lda: i32,
        b: *const f64,
        ldb: i32,
        beta: f64,
        c: *mut f64,
        ldc: i32,
    );
    fn openblas_set_num_threads(n: i32);
}

/// The element types BLAS multiplies.
trait Gemm: Real {
    /// `c [m, n] = op(a) op(b)` with row-major leading dims `lda`, `ldb`, `ldc`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &[Self],
        lda: usize,
        b: &[Self],
        ldb: usize,
        c: &mut [Self],
    );
}

/// Checks that `op(x)` of `rows x cols` with leading dim `ld` lies inside `x`, and converts
/// the sizes to BLAS ints.
fn check(len: usize, trans: bool, rows: usize, cols: usize, ld: usize) -> bool {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    r == 0 || c == 0 || (c <= ld && (r - 1) * ld + c <= len && ld <= i32::MAX as usize)
}

macro_rules! impl_gemm {
    ($t:ty, $f:ident) => {
        impl Gemm for $t {
            fn gemm(
                ta: bool,
                tb: bool,
                m: usize,
                n: usize,
                k: usize,
                a: &[Self],
                lda: usize,
                b: &[Self],
                ldb: usize,
                c: &mut [Self],
            ) {
                // The bounds BLAS will touch are inside the slices (asserted: a failure here
                // is a bug in this file, never a user error), and `c` is exclusively borrowed.
                assert!(
                    check(a.len(), ta, m, k, lda) && check(b.len(), tb, k, n, ldb) && check(c.len(), false, m, n, n)
                );
                assert!(m <= i32::MAX as usize && n <= i32::MAX as usize && k <= i32::MAX as usize);
                if m == 0 || n == 0 {
                    return;
                }
                #[allow(unsafe_code)] // SAFETY: sizes and leading dims checked against the slices above.
                unsafe {
                    $f(
                        ROW_MAJOR,
                        if ta { TRANS } else { NO_TRANS },
                        if tb { TRANS } else { NO_TRANS },
                        m as i32,
                        n as i32,
                        k as i32,
                        1.0,
                        a.as_ptr(),
                        lda as i32,
                        b.as_ptr(),
                        ldb as i32,
                        0.0,
                        c.as_mut_ptr(),
                        n as i32,
                    )
                }
            }
        }
    };
}
impl_gemm!(f32, cblas_sgemm);
impl_gemm!(f64, cblas_dgemm);

static SINGLE_THREADED: Once = Once::new();

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
/// same leading dims, f32 or f64, on the CPU (see [`usable`]).
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
pub fn usable(a: &Tensor, b: &Tensor) -> bool {
    let (ad, bd) = (a.dims(), b.dims());
    a.device().is_cpu()
        && b.device().is_cpu()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && ad.len() >= 2
        && ad.len() == bd.len()
        && ad[..ad.len() - 2] == bd[..bd.len() - 2]
}

struct MatMul;

fn fwd_typed<T: Gemm>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    SINGLE_THREADED.call_once(|| {
        #[allow(unsafe_code)] // SAFETY: sets a global thread count; no pointers involved.
        unsafe {
            openblas_set_num_threads(1)
        }
    });
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn rand(rng: &mut rand_chacha::ChaCha8Rng, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).expect("t")
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("v")
    }

    #[test]
    fn matches_candle_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // (a dims, b dims as stored, transpose a, transpose b)
        let cases: Vec<(Vec<usize>, Vec<usize>, bool, bool)> = vec![
            (vec![37, 19], vec![19, 23], false, false),
            (vec![70, 19], vec![23, 19], false, true),
            (vec![19, 70], vec![19, 23], true, false),
            (vec![19, 5], vec![23, 19], true, true),
            (vec![3, 2, 17, 8], vec![3, 2, 17, 8], false, true),
            (vec![6, 17, 17], vec![6, 17, 8], false, false),
            (vec![1, 8], vec![8, 1], false, false),
            (vec![4, 1, 9], vec![4, 9, 5], false, false),
        ];
        for dtype in [DType::F64, DType::F32] {
            for (ad, bd, ta, tb) in &cases {
                let a0 = rand(&mut rng, ad).to_dtype(dtype).expect("d");
                let b0 = rand(&mut rng, bd).to_dtype(dtype).expect("d");
                let run = |blas: bool| -> Vec<Vec<f64>> {
                    let a = Var::from_tensor(&a0).expect("v");
                    let b = Var::from_tensor(&b0).expect("v");
                    let at = if *ta {
                        a.as_tensor().t().expect("t")
                    } else {
                        a.as_tensor().clone()
                    };
                    let bt = if *tb {
                        b.as_tensor().t().expect("t")
                    } else {
                        b.as_tensor().clone()
                    };
                    assert!(usable(&at, &bt));
                    let c = if blas { matmul(&at, &bt) } else { at.matmul(&bt) }.expect("mm");
                    let w = rand(&mut rand_chacha::ChaCha8Rng::seed_from_u64(5), c.dims())
                        .to_dtype(dtype)
                        .expect("d");
                    let g = (&c * w)
                        .and_then(|l| l.sum_all())
                        .and_then(|l| l.backward())
                        .expect("bwd");
                    vec![
                        flat(&c),
                        flat(g.get(a.as_tensor()).expect("da")),
                        flat(g.get(b.as_tensor()).expect("db")),
                    ]
                };
                let (got, want) = (run(true), run(false));
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for (which, (g, w)) in ["C", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
                    assert_eq!(g.len(), w.len());
                    for (i, (x, y)) in g.iter().zip(w).enumerate() {
                        assert!(
                            (x - y).abs() <= tol * (1.0 + y.abs()),
                            "{dtype:?} {ad:?}x{bd:?} ta={ta} tb={tb} {which}[{i}]: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_batches_and_inner_dims_are_errors() {
        let a = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).expect("a");
        let b = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).expect("b");
        assert!(!usable(&a, &b));
        assert!(matmul(&a, &b).is_err());
        let b = Tensor::zeros((2, 5, 5), DType::F32, &Device::Cpu).expect("b");
        assert!(matmul(&a, &b).is_err());
    }
}
