//! The CUDA bias add and row sums: `bias.cu`, f32/f64/f16/bf16 (math in f32, f64 for f64);
//! the row sums per slice of rows, then over the slices in order.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use crate::kernels::cpu::rows::rows_width;
use crate::kernels::cuda::{
    by_element_dtype, by_float_dtype, kernel, launch, output, rows_config, view, width, ColumnSums, BIAS,
};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The forward on `x` (`s1`) and the bias (`s2`, `[n]`).
pub(super) fn fwd(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    let (_, n) = rows_width(l1.shape())?;
    if l2.shape().dims() != [n] || s1.dtype() != s2.dtype() {
        bail!(
            "fused-bias-add: bias {:?}/{:?} does not fit x {:?}/{:?}",
            l2.shape(),
            s2.dtype(),
            l1.shape(),
            s1.dtype()
        )
    }
    let out = by_element_dtype!(s1.dtype(), "fused-bias-add", fwd_typed((s1, l1), (s2, l2)))?;
    Ok((out, l1.shape().clone()))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(x: Arg, b: Arg) -> Result<CudaStorage> {
    let dev = x.0.device();
    let (rows, n) = rows_width(x.1.shape())?;
    let xs = view::<T>(x.0, x.1, "x")?;
    let bs = view::<T>(b.0, b.1, "bias")?;
    let out = output::<T>(dev, rows * n)?;
    let n_arg = width(n)?;
    launch!(
        dev,
        BIAS,
        kernel("bias_fwd", x.0.dtype())?,
        rows_config(rows, n)?,
        [&xs, &bs, &out, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The column sums of a `[.., n]` storage: `[n]`.
pub(super) fn sum_rows(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let (_, n) = rows_width(l.shape())?;
    let out = by_float_dtype!(s.dtype(), "fused-sum-rows", sum_rows_typed((s, l)))?;
    Ok((out, Shape::from(n)))
}

fn sum_rows_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(g: Arg) -> Result<CudaStorage> {
    let dev = g.0.device();
    let (rows, n) = rows_width(g.1.shape())?;
    let gs = view::<T>(g.0, g.1, "grad")?;
    let sums = ColumnSums::new(rows, n)?;
    let partials = output::<A>(dev, sums.partial_len(1, n))?;
    let out = output::<T>(dev, n)?;
    let (rows_arg, n_arg) = (width(rows)?, width(n)?);
    let dtype = g.0.dtype();
    launch!(
        dev,
        BIAS,
        kernel("sum_rows_partial", dtype)?,
        sums.partials,
        [&gs, &partials, &rows_arg, &n_arg, &sums.slice_rows]
    );
    launch!(
        dev,
        BIAS,
        kernel("sum_rows_finish", dtype)?,
        sums.finish,
        [&partials, &out, &sums.slices, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
