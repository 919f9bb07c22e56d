//! Fused linear layer: `y = x W + b` for `x [rows, in]`, `W [in, out]`, `b [out]` (or no
//! bias), as one candle op with a real backward:
//!
//! `dx = dy W^T`, `dW = x^T dy`, `db = sum_rows dy`.
//!
//! A weight stored `[out, in]` (the Hugging Face layout) enters the op as it is
//! ([`linear_t`]: `y = x W^T + b`, `dW = dy^T x`), so that the op's operand is the parameter
//! itself: its gradient then goes into the parameter's buffer in place where the engine
//! collects leaf gradients (`kernels::leaf_grads`), and to candle otherwise.
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
//!
//! With [`Products::Bf16`] ([`linear_t_bf16`], f32 only) every product of the forward and the
//! backward rounds both factors to bf16 and sums in f32 (`kernels::cpu::bf16_matmul`: the AMX
//! tiles where the CPU has them): the matrix products of a bf16 mixed-precision student on the
//! CPU, whose weights, activations and gradients stay f32.
//!
//! CPU only by design (a GPU library multiplies its own way): models choose it where
//! [`supports`] says yes (`models::nn::linear_opt`) and compose `matmul` and the bias add
//! elsewhere.

#[cfg(test)]
mod tests;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, InplaceOp3, Layout, Result, Shape, Tensor};

use crate::kernels::bias::SumRows;
use crate::kernels::cpu::bf16_matmul::bf16_gemm_into;
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::gemm::{gemm_into, Mat};
use crate::kernels::cpu::raw::{as_f32_mut, output_vec};
use crate::kernels::cpu::rows::{by_dtype, repeat_rows, slice_mut, with_last};
use crate::kernels::{leaf_grads, Support};

/// Where the fused linear layer runs: the CPU only.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// Whether [`linear`] runs on `x`, `w` and the optional bias `b` (one dtype, the CPU).
pub fn supports(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    match b {
        Some(b) => SUPPORT.admits_together(x, &[w, b]),
        None => SUPPORT.admits_together(x, &[w]),
    }
}

/// `x @ w + b` (`b` optional) for `x [.., in]` of any rank >= 1 whose leading dims fold into
/// rows without a copy (any contiguous tensor, a column slice, ...; others are made
/// contiguous) and `w [in, out]` of any strides, where [`supports`]. The result is a contiguous `[.., out]`: no reshape nodes are added to
/// the graph, so the backward accumulates no extra full-size gradients.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    apply(x, w, b, Linear::new(false, Products::Native))
}

/// `x @ w^T + b` for `w [out, in]` (any strides), otherwise as [`linear`]: the weight is the
/// op's operand as it is, so a parameter's gradient can go to its leaf-gradient buffer.
pub fn linear_t(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    apply(x, w, b, Linear::new(true, Products::Native))
}

/// [`linear_t`] with [`Products::Bf16`] for f32 `x`, `w` (and `b`); any other dtype is an
/// error.
pub fn linear_t_bf16(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    apply(x, w, b, Linear::new(true, Products::Bf16))
}

/// How the op's matrix products multiply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// In the operands' dtype (f32 or f64).
    Native,
    /// f32 operands rounded to bf16, products exact, sums in f32
    /// (`kernels::cpu::bf16_matmul`).
    Bf16,
}

/// `dst [m, n] (+)= a b` as `products` says (bf16 products: f32 operands only, else an error).
pub fn multiply<T: Real>(dst: &mut [T], accumulate: bool, a: &Mat<T>, b: &Mat<T>, products: Products) -> Result<()> {
    match products {
        Products::Native => gemm_into(dst, accumulate, a, b),
        Products::Bf16 => match (as_f32_mut(dst), a.as_f32(), b.as_f32()) {
            (Some(dst), Some(a), Some(b)) => bf16_gemm_into(dst, accumulate, &a, &b),
            _ => bail!("fused linear: bf16 products take f32 operands, got {:?}", T::DTYPE),
        },
    }
    Ok(())
}

fn apply(x: &Tensor, w: &Tensor, b: Option<&Tensor>, op: Linear) -> Result<Tensor> {
    let inp = x.dims().last().copied().unwrap_or(0);
    let (w_in, out) = match (w.dims2()?, op.transposed) {
        ((o, i), true) => (i, o),
        (d, false) => d,
    };
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
            x.apply_op3(w, &b.contiguous()?, op)
        }
        None => x.apply_op2(w, op),
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

/// The forward op: `CustomOp3` with a bias, `CustomOp2` without; `transposed`: the weight
/// operand is `[out, in]`.
#[derive(Clone, Copy)]
struct Linear {
    transposed: bool,
    products: Products,
}

impl Linear {
    fn new(transposed: bool, products: Products) -> Self {
        Linear { transposed, products }
    }
}

/// `dy [rows, out] @ w^T` (args `dy`, `w`; `w` `[out, in]` when `transposed`).
struct InputGrad(Linear);
/// `x^T @ dy`, or `dy^T @ x` when `transposed` (args `x`, `dy`).
struct WeightGrad(Linear);
/// [`WeightGrad`] written into a leaf-gradient buffer (added onto it when `accumulate`).
struct WeightGradInto {
    op: Linear,
    accumulate: bool,
}

/// The `[rows, last dim]` matrix of a tensor in a CPU storage whose leading dims fold into rows
/// (see [`rows_fold`]); a vector is one row.
fn mat_of<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Mat<'a, T>> {
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
    match Mat::strided(data, l.start_offset(), (rows, dims[r - 1]), (rs, stride[r - 1])) {
        Some(m) => Ok(m),
        None => bail!(
            "fused linear: {what}: layout {dims:?} / {stride:?} from {} reaches past its {} elements",
            l.start_offset(),
            data.len()
        ),
    }
}

/// `a @ b` into a fresh row-major vector, first filled with `init` rows when given (the
/// product is accumulated onto them) and left uninitialised otherwise.
fn product<T: Real>(a: &Mat<T>, b: &Mat<T>, init: Option<&[T]>, products: Products) -> Result<Vec<T>> {
    let (m, n) = (a.rows(), b.cols());
    // With a bias the product accumulates onto its rows; without, it overwrites every element.
    let mut out = match init {
        Some(row) => repeat_rows(None, row, m),
        None => output_vec(m * n),
    };
    multiply(&mut out, init.is_some(), a, b, products)?;
    Ok(out)
}

/// The `[in, out]` matrix of the weight operand.
fn weight_mat<'a, T: Real>(w: (&'a CpuStorage, &Layout), transposed: bool) -> Result<Mat<'a, T>> {
    let m = mat_of::<T>(w.0, w.1, "w")?;
    Ok(if transposed { m.t() } else { m })
}

fn forward<T: Real>(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    op: Linear,
) -> Result<(CpuStorage, Shape)> {
    let xm = mat_of::<T>(x.0, x.1, "x")?;
    let wm = weight_mat::<T>(w, op.transposed)?;
    if xm.cols() != wm.rows() {
        bail!(
            "fused linear: x [{}, {}] @ w [{}, {}]",
            xm.rows(),
            xm.cols(),
            wm.rows(),
            wm.cols()
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
            if end - start != wm.cols() {
                bail!(
                    "fused linear: bias has {} elements, w has {} columns",
                    end - start,
                    wm.cols()
                )
            }
            Some(&data[start..end])
        }
        None => None,
    };
    let out = product(&xm, &wm, bias, op.products)?;
    Ok((T::storage(out), with_last(x.1.shape(), wm.cols())))
}

/// The gradients of `y = x w (+ b)` given `dy`: `(dx, dw)`, each only when that argument is
/// tracked by autograd (the embedding input of a frozen model is not, for instance). A weight
/// the thread's leaf-gradient collector holds gets its gradient there (`dw` is then `None`).
fn grads(x: &Tensor, w: &Tensor, dy: &Tensor, op: Linear) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if x.track_op() {
        Some(dy.apply_op2_no_bwd(w, &InputGrad(op))?)
    } else {
        None
    };
    if !w.track_op() {
        return Ok((dx, None));
    }
    if let Some(claim) = leaf_grads::claim(w)? {
        let into = WeightGradInto {
            op,
            accumulate: claim.accumulate,
        };
        claim.buffer.inplace_op3(x, dy, &into)?;
        return Ok((dx, None));
    }
    Ok((dx, Some(x.apply_op2_no_bwd(dy, &WeightGrad(op))?)))
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
            || forward::<f32>((s1, l1), (s2, l2), Some((s3, l3)), *self),
            || forward::<f64>((s1, l1), (s2, l2), Some((s3, l3)), *self),
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
        let (dx, dw) = grads(x, w, dy, *self)?;
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
            || forward::<f32>((s1, l1), (s2, l2), None, *self),
            || forward::<f64>((s1, l1), (s2, l2), None, *self),
        )
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        grads(x, w, dy, *self)
    }
}

fn input_grad<T: Real>(
    dy: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    op: Linear,
) -> Result<(CpuStorage, Shape)> {
    let g = mat_of::<T>(dy.0, dy.1, "dy")?;
    let wt = weight_mat::<T>(w, op.transposed)?.t();
    if g.cols() != wt.rows() {
        bail!(
            "fused linear backward: dy has {} columns, w has {}",
            g.cols(),
            wt.rows()
        )
    }
    let out = product(&g, &wt, None, op.products)?;
    Ok((T::storage(out), with_last(dy.1.shape(), wt.cols())))
}

/// The two factors of the weight's gradient: `(x^T, dy)`, or `(dy^T, x)` for an `[out, in]`
/// weight.
fn weight_factors<'a, T: Real>(
    x: (&'a CpuStorage, &Layout),
    dy: (&'a CpuStorage, &Layout),
    transposed: bool,
) -> Result<(Mat<'a, T>, Mat<'a, T>)> {
    let xm = mat_of::<T>(x.0, x.1, "x")?;
    let g = mat_of::<T>(dy.0, dy.1, "dy")?;
    if xm.rows() != g.rows() {
        bail!("fused linear backward: x has {} rows, dy has {}", xm.rows(), g.rows())
    }
    Ok(if transposed { (g.t(), xm) } else { (xm.t(), g) })
}

fn weight_grad<T: Real>(
    x: (&CpuStorage, &Layout),
    dy: (&CpuStorage, &Layout),
    op: Linear,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = weight_factors::<T>(x, dy, op.transposed)?;
    let out = product(&a, &b, None, op.products)?;
    Ok((T::storage(out), Shape::from((a.rows(), b.cols()))))
}

fn weight_grad_into<T: Real>(
    dst: (&mut CpuStorage, &Layout),
    x: (&CpuStorage, &Layout),
    dy: (&CpuStorage, &Layout),
    op: &WeightGradInto,
) -> Result<()> {
    let (a, b) = weight_factors::<T>(x, dy, op.op.transposed)?;
    if dst.1.dims() != [a.rows(), b.cols()] {
        bail!(
            "fused linear backward: the weight's gradient buffer is {:?}, the gradient [{}, {}]",
            dst.1.dims(),
            a.rows(),
            b.cols()
        )
    }
    let out = slice_mut::<T>(dst.0, dst.1, "weight gradient buffer")?;
    multiply(out, op.accumulate, &a, &b, op.op.products)
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-dx"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-linear-dx",
            &[s1, s2],
            || input_grad::<f32>((s1, l1), (s2, l2), self.0),
            || input_grad::<f64>((s1, l1), (s2, l2), self.0),
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
            || weight_grad::<f32>((s1, l1), (s2, l2), self.0),
            || weight_grad::<f64>((s1, l1), (s2, l2), self.0),
        )
    }
}

impl InplaceOp3 for WeightGradInto {
    fn name(&self) -> &'static str {
        "fused-linear-dw-into"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        match s1.dtype() {
            DType::F32 => weight_grad_into::<f32>((s1, l1), (s2, l2), (s3, l3), self),
            DType::F64 => weight_grad_into::<f64>((s1, l1), (s2, l2), (s3, l3), self),
            other => bail!("fused-linear-dw-into: unsupported dtype {other:?}"),
        }
    }
}
