//! Fused linear layer: `y = x W + b` for `x [rows, in]`, `W [in, out]`, `b [out]` (or no
//! bias), as one candle op with a real backward:
//!
//! `dx = dy W^T`, `dW = x^T dy`, `db = sum_rows dy`.
//!
//! Every product goes straight to the `gemm` crate (the library candle's own CPU matmul uses,
//! with its AVX-512 kernels turned on in the workspace) with the operands' strides, so a
//! transposed weight (`wte.t()` for a tied head, `W^T` in the backward, `x^T` for `dW`) is read
//! in place and never copied. Against `matmul` followed by the bias kernel this saves, per
//! layer: zero-filling the output before the product (candle allocates it zeroed), the
//! separate bias pass over the output (the bias is written first and the product accumulated
//! onto it), and candle's transposed-operand bookkeeping in the backward. Products run on the
//! rayon pool through `gemm`'s own row/column split.
//!
//! Outputs that the product overwrites entirely are not initialised first.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::bias::SumRows;
use super::fastmath::Real;
use super::rows::{by_dtype, output_vec, repeat_rows};

/// `x @ w + b` (`b` optional) for `x [.., in]` of any rank >= 1 whose leading dims fold into
/// rows without a copy (any contiguous tensor, a column slice, ...; others are made
/// contiguous) and `w [in, out]` of any strides, f32/f64 on the CPU (see
/// [`super::fusable`]). The result is a contiguous `[.., out]`: no reshape nodes are added to
/// the graph, so the backward accumulates no extra full-size gradients.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let inp = x.dims().last().copied().unwrap_or(0);
    let (w_in, out) = w.dims2()?;
    if x.rank() == 0 || w_in != inp {
        bail!("fused linear: x {:?} @ w [{w_in}, {out}]: inner dims differ", x.dims())
    }
    let x = if rows_fold(x.layout()) {
        x.clone()
    } else {
        x.contiguous()?
    };
    match b {
        Some(b) => {
            if b.dims() != [out] {
                bail!("fused linear: bias {:?} must be [{out}]", b.dims())
            }
            x.apply_op3(w, &b.contiguous()?, Linear)
        }
        None => x.apply_op2(w, Linear),
    }
}

/// Whether the leading dims of `l` fold into one row dim (each stride is the next one times
/// the next dim, ignoring dims of size 1).
fn rows_fold(l: &Layout) -> bool {
    let (dims, stride) = (l.dims(), l.stride());
    let r = dims.len();
    if r <= 2 {
        return true;
    }
    let mut expect = stride[r - 2];
    let mut size = dims[r - 2];
    for i in (0..r - 2).rev() {
        expect *= size;
        if dims[i] > 1 && stride[i] != expect {
            return false;
        }
        size = dims[i];
    }
    true
}

/// `shape` with its last dim replaced by `last`.
fn with_last(dims: &[usize], last: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    Shape::from(d)
}

/// The forward op: `CustomOp3` with a bias, `CustomOp2` without.
struct Linear;
/// `dy [rows, out] @ w^T` (args `dy`, `w`).
struct InputGrad;
/// `x^T @ dy` (args `x`, `dy`).
struct WeightGrad;

/// A strided 2-D operand inside a CPU storage: element `(i, j)` is
/// `data[offset + i * rs + j * cs]`.
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T: Real> Mat<'a, T> {
    /// The `[rows, last dim]` matrix of a tensor whose leading dims fold into rows (see
    /// [`rows_fold`]); a vector is one row.
    fn of(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        let Some(data) = T::slice(s) else {
            bail!("fused linear: {what}: expected {:?}, got {:?}", T::DTYPE, s.dtype())
        };
        let (dims, stride) = (l.dims(), l.stride());
        let r = dims.len();
        if r == 0 || !rows_fold(l) {
            bail!("fused linear: {what}: expected rows of a matrix, got shape {dims:?} strides {stride:?}")
        }
        let rows = dims[..r - 1].iter().product();
        let rs = if r >= 2 { stride[r - 2] } else { 0 };
        let m = Mat {
            data,
            offset: l.start_offset(),
            rows,
            cols: dims[r - 1],
            rs,
            cs: stride[r - 1],
        };
        // The last element the strides reach must lie inside the storage (checked here, once,
        // so that the raw-pointer products below stay in bounds).
        if m.rows > 0 && m.cols > 0 {
            let last = m.offset + (m.rows - 1) * m.rs + (m.cols - 1) * m.cs;
            if last >= data.len() {
                bail!("fused linear: {what}: layout reaches element {last} of {}", data.len())
            }
        }
        Ok(m)
    }

    /// A row-major contiguous `[rows, cols]` matrix over `data`.
    pub(crate) fn dense(data: &'a [T], rows: usize, cols: usize) -> Self {
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
    pub(crate) fn t(&self) -> Self {
        Mat {
            data: self.data,
            offset: self.offset,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst [m, n] = (dst if accumulate) + a [m, k] @ b [k, n]`, `dst` row-major contiguous,
/// spread over the rayon pool by `gemm`. With `accumulate = false` `dst` is only written, so
/// it may hold anything (uninitialised memory included) on entry.
///
/// # Safety
/// `dst` must be valid for `a.rows * b.cols` writes (and reads if `accumulate`).
#[allow(unsafe_code)]
unsafe fn product_into<T: Real>(dst: *mut T, accumulate: bool, a: &Mat<T>, b: &Mat<T>) {
    assert_eq!(a.cols, b.rows, "fused linear: inner dims (checked by the callers)");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            // SAFETY: `dst` is valid for m * n writes (the caller's contract).
            unsafe { std::ptr::write_bytes(dst, 0, m * n) };
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Mat::of` checked that every element the strides reach lies inside `data`;
    // `dst` is valid for m * n elements (the caller's contract) with row stride n; `gemm`
    // does not read `dst` when `read_dst` is false (`dst := beta * a b` then).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
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

/// `dst [m, n] = (dst if accumulate) + a @ b` into a row-major slice (for ops that fuse several
/// layers; products spread over the rayon pool).
pub(crate) fn gemm_into<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>) {
    assert!(a.cols == b.rows && dst.len() == a.rows * b.cols, "gemm_into: shapes");
    #[allow(unsafe_code)]
    // SAFETY: `dst` holds exactly m * n elements.
    unsafe {
        product_into(dst.as_mut_ptr(), accumulate, a, b)
    }
}

/// `a @ b` into a fresh row-major vector, first filled with `init` rows when given (the
/// product is accumulated onto them) and left uninitialised otherwise.
fn product<T: Real>(a: &Mat<T>, b: &Mat<T>, init: Option<&[T]>) -> Vec<T> {
    let (m, n) = (a.rows, b.cols);
    // With a bias the product accumulates onto its rows; without, it overwrites every element.
    let mut out = match init {
        Some(row) => repeat_rows(None, row, m),
        None => output_vec(m * n),
    };
    gemm_into(&mut out, init.is_some(), a, b);
    out
}

fn forward<T: Real>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let xm = Mat::<T>::of(x.0, x.1, "x")?;
    let wm = Mat::<T>::of(w.0, w.1, "w")?;
    if xm.cols != wm.rows {
        bail!(
            "fused linear: x [{}, {}] @ w [{}, {}]",
            xm.rows,
            xm.cols,
            wm.rows,
            wm.cols
        )
    }
    let bias = match b {
        Some((s, l)) => {
            let Some((start, end)) = l.contiguous_offsets() else {
                bail!("fused linear: bias: expected a contiguous tensor")
            };
            let Some(data) = T::slice(s) else {
                bail!("fused linear: bias: expected {:?}, got {:?}", T::DTYPE, s.dtype())
            };
            if end - start != wm.cols {
                bail!(
                    "fused linear: bias has {} elements, w has {} columns",
                    end - start,
                    wm.cols
                )
            }
            Some(&data[start..end])
        }
        None => None,
    };
    let out = product(&xm, &wm, bias);
    Ok((T::storage(out), with_last(x.1.dims(), wm.cols)))
}

/// The gradients of `y = x w (+ b)` given `dy`: `(dx, dw)`, each only when that argument is
/// tracked by autograd (the embedding input of a frozen model is not, for instance).
fn grads(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if x.track_op() {
        Some(dy.apply_op2_no_bwd(w, &InputGrad)?)
    } else {
        None
    };
    let dw = if w.track_op() {
        Some(x.apply_op2_no_bwd(dy, &WeightGrad)?)
    } else {
        None
    };
    Ok((dx, dw))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-linear",
            &[s1, s2, s3],
            || forward::<f32>((s1, l1), (s2, l2), Some((s3, l3))),
            || forward::<f64>((s1, l1), (s2, l2), Some((s3, l3))),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = grads(x, w, dy)?;
        let db = if b.track_op() {
            Some(dy.contiguous()?.apply_op1_no_bwd(&SumRows)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-linear",
            &[s1, s2],
            || forward::<f32>((s1, l1), (s2, l2), None),
            || forward::<f64>((s1, l1), (s2, l2), None),
        )
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        grads(x, w, dy)
    }
}

fn input_grad<T: Real>(dy: (&CpuStorage, &Layout), w: (&CpuStorage, &Layout)) -> Result<(CpuStorage, Shape)> {
    let g = Mat::<T>::of(dy.0, dy.1, "dy")?;
    let wt = Mat::<T>::of(w.0, w.1, "w")?.t();
    if g.cols != wt.rows {
        bail!("fused linear backward: dy has {} columns, w has {}", g.cols, wt.rows)
    }
    let out = product(&g, &wt, None);
    Ok((T::storage(out), with_last(dy.1.dims(), wt.cols)))
}

fn weight_grad<T: Real>(x: (&CpuStorage, &Layout), dy: (&CpuStorage, &Layout)) -> Result<(CpuStorage, Shape)> {
    let xt = Mat::<T>::of(x.0, x.1, "x")?.t();
    let g = Mat::<T>::of(dy.0, dy.1, "dy")?;
    if xt.cols != g.rows {
        bail!("fused linear backward: x has {} rows, dy has {}", xt.cols, g.rows)
    }
    let out = product(&xt, &g, None);
    Ok((T::storage(out), Shape::from((xt.rows, g.cols))))
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-dx"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-linear-dx",
            &[s1, s2],
            || input_grad::<f32>((s1, l1), (s2, l2)),
            || input_grad::<f64>((s1, l1), (s2, l2)),
        )
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "fused-linear-dw"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-linear-dw",
            &[s1, s2],
            || weight_grad::<f32>((s1, l1), (s2, l2)),
            || weight_grad::<f64>((s1, l1), (s2, l2)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::values;
    use candle_core::{DType, Device, Var};

    fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            assert!((u - v).abs() <= tol * scale, "{what}[{i}]: {u} vs {v}");
        }
    }

    /// Values and all three gradients against candle's `matmul` + `broadcast_add`, in f64
    /// and f32, for a plain weight, a transposed (tied-head style) weight, and no bias; the
    /// input is a strided view (a column slice) to exercise non-contiguous reads.
    #[test]
    fn matches_matmul_plus_bias_values_and_gradients() {
        let dev = Device::Cpu;
        let (rows, inp, out) = (37, 19, 23);
        let x_full = Tensor::arange(0f64, (rows * (inp + 3)) as f64, &dev)
            .and_then(|t| t.reshape((rows, inp + 3)))
            .and_then(|t| (t * 0.37)?.sin())
            .expect("x");
        let w0 = Tensor::arange(0f64, (inp * out) as f64, &dev)
            .and_then(|t| t.reshape((inp, out)))
            .and_then(|t| (t * 0.11)?.cos())
            .expect("w");
        let b0 = Tensor::arange(0f64, out as f64, &dev)
            .and_then(|t| (t * 0.7)?.sin())
            .expect("b");
        let c0 = Tensor::arange(0f64, (rows * out) as f64, &dev)
            .and_then(|t| t.reshape((rows, out)))
            .and_then(|t| (t * 0.05)?.cos())
            .expect("c");
        for dtype in [DType::F64, DType::F32] {
            for (transposed_w, with_bias) in [(false, true), (true, true), (false, false), (true, false)] {
                let run = |fused: bool| -> Vec<Vec<f64>> {
                    let xv = Var::from_tensor(&x_full.to_dtype(dtype).expect("d")).expect("x");
                    let x = xv.as_tensor().narrow(1, 2, inp).expect("narrow");
                    // Transposed: the weight is stored [out, in] and used as `w.t()`.
                    let wv = if transposed_w {
                        Var::from_tensor(
                            &w0.t()
                                .and_then(|t| t.contiguous())
                                .and_then(|t| t.to_dtype(dtype))
                                .expect("w"),
                        )
                    } else {
                        Var::from_tensor(&w0.to_dtype(dtype).expect("w"))
                    }
                    .expect("w");
                    let w = if transposed_w {
                        wv.as_tensor().t().expect("t")
                    } else {
                        wv.as_tensor().clone()
                    };
                    let bv = Var::from_tensor(&b0.to_dtype(dtype).expect("b")).expect("b");
                    let y = if fused {
                        linear(&x, &w, with_bias.then(|| bv.as_tensor())).expect("fused")
                    } else {
                        let y = x.matmul(&w).expect("mm");
                        if with_bias {
                            y.broadcast_add(bv.as_tensor()).expect("add")
                        } else {
                            y
                        }
                    };
                    let g = (&y * c0.to_dtype(dtype).expect("d"))
                        .and_then(|l| l.sum_all())
                        .and_then(|l| l.backward())
                        .expect("bwd");
                    let mut v = vec![
                        values(&y),
                        values(g.get(xv.as_tensor()).expect("dx")),
                        values(g.get(wv.as_tensor()).expect("dw")),
                    ];
                    if with_bias {
                        v.push(values(g.get(bv.as_tensor()).expect("db")));
                    } else {
                        assert!(g.get(bv.as_tensor()).is_none(), "no bias, no gradient");
                    }
                    v
                };
                let (a, c) = (run(true), run(false));
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for (k, (p, q)) in a.iter().zip(&c).enumerate() {
                    assert_close(
                        &format!("{dtype:?} transposed {transposed_w} bias {with_bias} out {k}"),
                        p,
                        q,
                        tol,
                    );
                }
            }
        }
    }

    /// A `[2, 3, in]` input gives the rows of the `[6, in]` product, and its gradient comes
    /// back in the input's shape.
    #[test]
    fn batched_input_folds_into_rows() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 5.0, &dev)
            .and_then(|t| t.reshape((2, 3, 5)))
            .expect("x");
        let x = Var::from_tensor(&(x * 0.1).expect("s")).expect("var");
        let w = Tensor::arange(0f32, 5.0 * 4.0, &dev)
            .and_then(|t| t.reshape((5, 4)))
            .expect("w");
        let y = linear(x.as_tensor(), &w, None).expect("y");
        assert_eq!(y.dims(), [2, 3, 4]);
        let flat = x.as_tensor().reshape((6, 5)).and_then(|x| x.matmul(&w)).expect("mm");
        assert_close("values", &values(&y), &values(&flat), 1e-6);
        let g = y.sum_all().and_then(|l| l.backward()).expect("bwd");
        let dx = g.get(x.as_tensor()).expect("dx");
        assert_eq!(dx.dims(), [2, 3, 5]);
        let want = Tensor::ones((6, 4), DType::F32, &dev)
            .and_then(|o| o.matmul(&w.t()?))
            .expect("want");
        assert_close("dx", &values(dx), &values(&want), 1e-6);
    }

    /// A product that overwrites its output must not read it: a NaN-poisoned destination
    /// (NaN * 0 is NaN, so any read would show) gives the exact product.
    #[test]
    fn overwriting_product_never_reads_the_destination() {
        let (m, k, n) = (70, 33, 41);
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32) - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32) - 2.0).collect();
        let am = Mat {
            data: &a,
            offset: 0,
            rows: m,
            cols: k,
            rs: k,
            cs: 1,
        };
        let bm = Mat {
            data: &b,
            offset: 0,
            rows: k,
            cols: n,
            rs: n,
            cs: 1,
        };
        let mut dst = vec![f32::NAN; m * n];
        #[allow(unsafe_code)]
        // SAFETY: `dst` holds m * n elements.
        unsafe {
            product_into(dst.as_mut_ptr(), false, &am, &bm)
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
                assert_eq!(dst[i * n + j], want, "({i}, {j})");
            }
        }
    }

    /// Shapes that do not fit are refused with a message, not a panic.
    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 3), DType::F32, &dev).expect("x");
        let w = Tensor::zeros((5, 2), DType::F32, &dev).expect("w");
        let err = linear(&x, &w, None).expect_err("inner dims");
        assert!(err.to_string().contains("inner dims"), "{err}");
        let w = Tensor::zeros((3, 2), DType::F32, &dev).expect("w");
        let b = Tensor::zeros(3, DType::F32, &dev).expect("b");
        let err = linear(&x, &w, Some(&b)).expect_err("bias");
        assert!(err.to_string().contains("bias"), "{err}");
    }
}
