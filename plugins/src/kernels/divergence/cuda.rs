//! The CUDA divergences: `divergence.cu`, one block per row, f32/f64/f16/bf16 logits; the row
//! statistics in f32 (f64 for f64 logits) whatever the logits' dtype.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use super::{DivergenceBwd, DivergenceFwd, COLS};
use crate::kernels::cpu::rows::{rows_width, with_last};
use crate::kernels::cuda::{by_float_dtype, kernel, launch, output, rows_config, view, width, DIVERGENCE};

/// The forward on student (`s1`) and teacher (`s2`) logits of one shape and dtype.
pub(super) fn fwd(
    op: &DivergenceFwd,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
        bail!(
            "fused-divergence: operands {:?}/{:?} and {:?}/{:?} differ",
            l1.shape(),
            s1.dtype(),
            l2.shape(),
            s2.dtype()
        )
    }
    let out = by_float_dtype!(s1.dtype(), "fused-divergence", fwd_typed(op, s1, l1, s2, l2))?;
    Ok((out, with_last(l1.shape(), COLS)))
}

/// `T` the logits, `A` the statistics.
fn fwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    op: &DivergenceFwd,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    let dev = s1.device();
    let (rows, v) = rows_width(l1.shape())?;
    let zs = view::<T>(s1, l1, "student logits")?;
    let zt = view::<T>(s2, l2, "teacher logits")?;
    let out = output::<A>(dev, rows * COLS)?;
    let (kind, param) = op.kind.kernel_code();
    let (v_arg, inv_t) = (width(v)?, op.inv_t);
    let func = kernel("divergence_fwd", s1.dtype())?;
    launch!(
        dev,
        DIVERGENCE,
        func,
        rows_config(rows, v)?,
        [&zs, &zt, &out, &v_arg, &kind, &inv_t, &param]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `(student, teacher, (D, lse_a, lse_b, aux, g) per row)`.
pub(super) fn bwd(op: &DivergenceBwd, st: [(&CudaStorage, &Layout); 3]) -> Result<(CudaStorage, Shape)> {
    let out = by_float_dtype!(st[0].0.dtype(), "fused-divergence-grad", bwd_typed(op, st))?;
    Ok((out, st[0].1.shape().clone()))
}

fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    op: &DivergenceBwd,
    [(s1, l1), (s2, l2), (s3, l3)]: [(&CudaStorage, &Layout); 3],
) -> Result<CudaStorage> {
    let dev = s1.device();
    let (rows, v) = rows_width(l1.shape())?;
    if l2.shape() != l1.shape() || rows_width(l3.shape())? != (rows, COLS + 1) {
        bail!(
            "fused-divergence-grad: operands {:?}, {:?}, {:?} disagree",
            l1.shape(),
            l2.shape(),
            l3.shape()
        )
    }
    let zs = view::<T>(s1, l1, "student logits")?;
    let zt = view::<T>(s2, l2, "teacher logits")?;
    let stats = view::<A>(s3, l3, "saved row statistics")?;
    let grad = output::<T>(dev, rows * v)?;
    let (kind, param) = op.kind.kernel_code();
    let (v_arg, inv_t) = (width(v)?, op.inv_t);
    let func = kernel("divergence_bwd", s1.dtype())?;
    launch!(
        dev,
        DIVERGENCE,
        func,
        rows_config(rows, v)?,
        [&zs, &zt, &stats, &grad, &v_arg, &kind, &inv_t, &param]
    );
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
}
