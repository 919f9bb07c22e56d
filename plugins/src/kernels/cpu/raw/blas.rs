//! The CBLAS interface of the system BLAS (`cblas_sgemm` / `cblas_dgemm`, OpenBLAS from
//! Debian's `libopenblas-dev`; LP64: `blasint` is a C `int`), behind a safe [`Blas::gemm`]
//! that checks every bound BLAS will touch against the slices it is given.

use std::sync::Once;

use crate::kernels::cpu::fastmath::Real;

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

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
pub trait Blas: Real {
    /// `c [m, n] = op(a) op(b)` with row-major leading dims `lda`, `ldb` (`c`: `n`), where
    /// `op(x)` is `x` stored transposed when `ta` / `tb`.
    ///
    /// # Panics
    /// When an element BLAS would touch lies outside `a`, `b` or `c`, or a size exceeds a C
    /// `int` (a bug in the caller, never a user error).
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

/// Whether `op(x)` of `rows x cols` with leading dim `ld` lies inside `len` elements and the
/// sizes fit BLAS ints.
fn check(len: usize, trans: bool, rows: usize, cols: usize, ld: usize) -> bool {
    let (r, c) = if trans { (cols, rows) } else { (rows, cols) };
    r == 0 || c == 0 || (c <= ld && (r - 1) * ld + c <= len && ld <= i32::MAX as usize)
}

macro_rules! impl_blas {
    ($t:ty, $f:ident) => {
        impl Blas for $t {
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
                assert!(
                    check(a.len(), ta, m, k, lda) && check(b.len(), tb, k, n, ldb) && check(c.len(), false, m, n, n)
                );
                assert!(m <= i32::MAX as usize && n <= i32::MAX as usize && k <= i32::MAX as usize);
                if m == 0 || n == 0 {
                    return;
                }
                // SAFETY: sizes and leading dims checked against the slices above; `c` is
                // exclusively borrowed.
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
impl_blas!(f32, cblas_sgemm);
impl_blas!(f64, cblas_dgemm);

static SINGLE_THREADED: Once = Once::new();

/// Tells OpenBLAS, once per process, to run on the calling thread only (the callers spread
/// their work over the rayon pool themselves).
pub fn single_threaded() {
    SINGLE_THREADED.call_once(|| {
        // SAFETY: sets a global thread count; no pointers involved.
        unsafe { openblas_set_num_threads(1) }
    });
}
