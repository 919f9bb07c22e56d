//! The CUDA GELU (tanh approximation): `gelu.cu`, element-wise grid-stride kernels,
//! f32/f64/f16/bf16 (math in f32, f64 for f64).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use crate::kernels::cuda::{by_element_dtype, elements_config, kernel, launch, output, view, GELU};

/// The forward over a storage.
pub(super) fn fwd(s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let out = by_element_dtype!(s.dtype(), "fused-gelu", fwd_typed(s, l))?;
    Ok((out, l.shape().clone()))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = s.device();
    let n = l.shape().elem_count();
    let xs = view::<T>(s, l, "gelu input")?;
    let out = output::<T>(dev, n)?;
    let n_arg = n as u64;
    launch!(
        dev,
        GELU,
        kernel("gelu_fwd", s.dtype())?,
        elements_config(n),
        [&xs, &out, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward from the input `x` (`s1`) and the incoming gradient (`s2`).
pub(super) fn bwd(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
        bail!(
            "fused-gelu-grad: x {:?}/{:?} and grad {:?}/{:?} differ",
            l1.shape(),
            s1.dtype(),
            l2.shape(),
            s2.dtype()
        )
    }
    let out = by_element_dtype!(s1.dtype(), "fused-gelu-grad", bwd_typed(s1, l1, s2, l2))?;
    Ok((out, l1.shape().clone()))
}

fn bwd_typed<T: CudaDType + DeviceRepr>(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    let dev = s1.device();
    let n = l1.shape().elem_count();
    let xs = view::<T>(s1, l1, "x")?;
    let gs = view::<T>(s2, l2, "grad")?;
    let out = output::<T>(dev, n)?;
    let n_arg = n as u64;
    launch!(
        dev,
        GELU,
        kernel("gelu_bwd", s1.dtype())?,
        elements_config(n),
        [&xs, &gs, &out, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
