//! The CUDA RMSNorm: `rms_norm.cu`, one block per row, f32/f64/f16/bf16; row statistics in
//! f32 (f64 for f64); `dw` summed per slice of rows, then over the slices in order.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape, Storage, Tensor};

use crate::kernels::cpu::rows::rows_width;
use crate::kernels::cuda::{
    by_element_dtype, by_float_dtype, kernel, launch, output, rows_config, view, width, ColumnSums, RMS_NORM,
};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The forward on `x` (`s1`) and the weight (`s2`).
pub(super) fn fwd(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let out = by_element_dtype!(s1.dtype(), "fused-rms-norm", fwd_typed(eps, (s1, l1), (s2, l2)))?;
    Ok((out, l1.shape().clone()))
}

/// `(rows, d)` of `x`, checked against the weight `[d]` (same dtype).
fn sizes(x: Arg, w: Arg, what: &str) -> Result<(usize, usize)> {
    let (rows, d) = rows_width(x.1.shape())?;
    if w.1.shape().dims() != [d] || w.0.dtype() != x.0.dtype() {
        bail!(
            "{what}: weight {:?}/{:?} does not fit x {:?}/{:?}",
            w.1.shape(),
            w.0.dtype(),
            x.1.shape(),
            x.0.dtype()
        )
    }
    Ok((rows, d))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(eps: f64, x: Arg, w: Arg) -> Result<CudaStorage> {
    let dev = x.0.device();
    let (rows, d) = sizes(x, w, "fused-rms-norm")?;
    let xs = view::<T>(x.0, x.1, "x")?;
    let ws = view::<T>(w.0, w.1, "weight")?;
    let out = output::<T>(dev, rows * d)?;
    let d_arg = width(d)?;
    let func = kernel("rms_fwd", x.0.dtype())?;
    launch!(
        dev,
        RMS_NORM,
        func,
        rows_config(rows, d)?,
        [&xs, &ws, &out, &d_arg, &eps]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `x` (`s1`) and `gy` (`s2`) with the forward's `weight`: `dx` rows, then a
/// `dw` row (`[rows + 1, d]`).
pub(super) fn bwd(
    eps: f64,
    weight: &Tensor,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (ws, wl) = weight.storage_and_layout();
    let Storage::Cuda(ws) = &*ws else {
        bail!("fused-rms-norm-grad: expected a CUDA weight")
    };
    if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
        bail!(
            "fused-rms-norm-grad: x {:?}/{:?} and grad {:?}/{:?} differ",
            l1.shape(),
            s1.dtype(),
            l2.shape(),
            s2.dtype()
        )
    }
    let (rows, d) = sizes((s1, l1), (ws, wl), "fused-rms-norm-grad")?;
    let out = by_float_dtype!(
        s1.dtype(),
        "fused-rms-norm-grad",
        bwd_typed(eps, (s1, l1), (ws, wl), (s2, l2))
    )?;
    Ok((out, Shape::from((rows + 1, d))))
}

fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    eps: f64,
    x: Arg,
    w: Arg,
    gy: Arg,
) -> Result<CudaStorage> {
    let dev = x.0.device();
    let (rows, d) = rows_width(x.1.shape())?;
    let xs = view::<T>(x.0, x.1, "x")?;
    let ws = view::<T>(w.0, w.1, "weight")?;
    let gys = view::<T>(gy.0, gy.1, "grad")?;
    let mut out = output::<T>(dev, (rows + 1) * d)?;
    let rs = output::<A>(dev, rows.max(1))?;
    let d_arg = width(d)?;
    let dtype = x.0.dtype();
    launch!(
        dev,
        RMS_NORM,
        kernel("rms_bwd", dtype)?,
        rows_config(rows, d)?,
        [&xs, &ws, &gys, &out, &rs, &d_arg, &eps]
    );
    let sums = ColumnSums::new(rows, d)?;
    let partials = output::<A>(dev, sums.partial_len(1, d))?;
    let rows_arg = width(rows)?;
    launch!(
        dev,
        RMS_NORM,
        kernel("rms_dw_partial", dtype)?,
        sums.partials,
        [&xs, &gys, &rs, &partials, &rows_arg, &d_arg, &sums.slice_rows]
    );
    {
        let mut dw = out.slice_mut(rows * d..);
        launch!(
            dev,
            RMS_NORM,
            kernel("rms_dw_finish", dtype)?,
            sums.finish,
            [&partials, &mut dw, &sums.slices, &d_arg]
        );
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
