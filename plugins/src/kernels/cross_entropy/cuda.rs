//! The CUDA cross-entropy: `cross_entropy.cu`, one block per row, f32/f64/f16/bf16 logits; the
//! row statistics in f32 (f64 for f64 logits).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use super::COLS;
use crate::kernels::cpu::rows::{rows_width, with_last};
use crate::kernels::cuda::{by_float_dtype, kernel, launch, output, rows_config, view, width, CROSS_ENTROPY};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The forward on the logits (`s1`) and the `u32` targets (`s2`): `(L, lse)` per row.
pub(super) fn fwd(
    eps: f64,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let out = by_float_dtype!(s1.dtype(), "fused-cross-entropy", fwd_typed(eps, (s1, l1), (s2, l2)))?;
    Ok((out, with_last(l1.shape(), COLS)))
}

/// `(rows, v)` of the logits, checked against the targets.
fn sizes(z: &Layout, y: &Layout) -> Result<(usize, usize)> {
    let (rows, v) = rows_width(z.shape())?;
    if y.shape().elem_count() != rows {
        bail!(
            "fused-cross-entropy: logits {:?} and targets {:?} disagree",
            z.shape(),
            y.shape()
        )
    }
    Ok((rows, v))
}

fn fwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(eps: f64, z: Arg, y: Arg) -> Result<CudaStorage> {
    let dev = z.0.device();
    let (rows, v) = sizes(z.1, y.1)?;
    let logits = view::<T>(z.0, z.1, "logits")?;
    let targets = view::<u32>(y.0, y.1, "targets")?;
    let out = output::<A>(dev, rows * COLS)?;
    let v_arg = width(v)?;
    let func = kernel("ce_fwd", z.0.dtype())?;
    launch!(
        dev,
        CROSS_ENTROPY,
        func,
        rows_config(rows, v)?,
        [&logits, &targets, &out, &v_arg, &eps]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `(logits, targets, (L, lse, g) per row)`: `g dL/dz`.
pub(super) fn bwd(eps: f64, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    let out = by_float_dtype!(st[0].0.dtype(), "fused-cross-entropy-grad", bwd_typed(eps, st))?;
    Ok((out, st[0].1.shape().clone()))
}

fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(eps: f64, st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let (rows, v) = sizes(st[0].1, st[1].1)?;
    if rows_width(st[2].1.shape())? != (rows, COLS + 1) {
        bail!(
            "fused-cross-entropy-grad: statistics {:?} do not match {rows} rows",
            st[2].1.shape()
        )
    }
    let logits = view::<T>(st[0].0, st[0].1, "logits")?;
    let targets = view::<u32>(st[1].0, st[1].1, "targets")?;
    let stats = view::<A>(st[2].0, st[2].1, "saved row statistics")?;
    let grad = output::<T>(dev, rows * v)?;
    let v_arg = width(v)?;
    let func = kernel("ce_bwd", st[0].0.dtype())?;
    launch!(
        dev,
        CROSS_ENTROPY,
        func,
        rows_config(rows, v)?,
        [&logits, &targets, &stats, &grad, &v_arg, &eps]
    );
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
}
