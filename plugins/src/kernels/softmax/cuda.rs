//! The CUDA softmax (plain and causal): `softmax.cu`, one block per row, f32/f64/f16/bf16
//! (math in f32, f64 for f64).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use crate::kernels::cpu::rows::rows_width;
use crate::kernels::cuda::{by_element_dtype, kernel, launch, output, rows_config, view, width, SOFTMAX};

/// The forward (`causal`: row `r` keeps its first `r % width + 1` columns).
pub(super) fn fwd(causal: bool, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let out = by_element_dtype!(s.dtype(), "fused-softmax", fwd_typed(causal, s, l))?;
    Ok((out, l.shape().clone()))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(causal: bool, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = s.device();
    let (rows, v) = rows_width(l.shape())?;
    let xs = view::<T>(s, l, "scores")?;
    let out = output::<T>(dev, rows * v)?;
    let (v_arg, causal_arg) = (width(v)?, i32::from(causal));
    launch!(
        dev,
        SOFTMAX,
        kernel("softmax_fwd", s.dtype())?,
        rows_config(rows, v)?,
        [&xs, &out, &v_arg, &causal_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward from the saved output `y` (`s1`) and the incoming gradient (`s2`).
pub(super) fn bwd(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
        bail!(
            "fused-softmax-grad: output {:?}/{:?} and grad {:?}/{:?} differ",
            l1.shape(),
            s1.dtype(),
            l2.shape(),
            s2.dtype()
        )
    }
    let out = by_element_dtype!(s1.dtype(), "fused-softmax-grad", bwd_typed(s1, l1, s2, l2))?;
    Ok((out, l1.shape().clone()))
}

fn bwd_typed<T: CudaDType + DeviceRepr>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    let dev = s1.device();
    let (rows, v) = rows_width(l1.shape())?;
    let ys = view::<T>(s1, l1, "softmax output")?;
    let gs = view::<T>(s2, l2, "grad")?;
    let out = output::<T>(dev, rows * v)?;
    let v_arg = width(v)?;
    launch!(
        dev,
        SOFTMAX,
        kernel("softmax_bwd", s1.dtype())?,
        rows_config(rows, v)?,
        [&ys, &gs, &out, &v_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
