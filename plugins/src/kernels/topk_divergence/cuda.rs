//! The CUDA top-k KL: `topk_divergence.cu`, one block per row, f32/f64/f16/bf16 logits; the
//! teacher log-probs and the row statistics in f32 (f64 for f64 logits).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use super::{TopkBwd, TopkFwd, TopkTail, COLS, EPS};
use crate::kernels::cpu::rows::{rows_width, with_last};
use crate::kernels::cuda::{by_float_dtype, kernel, launch, output, rows_config, view, width, TOPK_DIVERGENCE};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

fn tail_code(tail: TopkTail) -> i32 {
    match tail {
        TopkTail::Bucket => 0,
        TopkTail::Renormalize => 1,
    }
}

/// The forward on `(student logits, u32 ids, teacher log-probs)`.
pub(super) fn fwd(op: &TopkFwd, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    let out = by_float_dtype!(st[0].0.dtype(), "fused-topk-kl", fwd_typed(op, st))?;
    Ok((out, with_last(st[0].1.shape(), COLS)))
}

/// `(rows, v, k)` of the operands, checked against each other.
fn sizes(st: &[Arg; 3], stats_width: usize) -> Result<(usize, usize, usize)> {
    let (rows, v) = rows_width(st[0].1.shape())?;
    let (id_rows, k) = rows_width(st[1].1.shape())?;
    if id_rows != rows || rows_width(st[2].1.shape())? != (rows, k + stats_width) {
        bail!(
            "fused-topk-kl: operands {:?}, {:?}, {:?} disagree",
            st[0].1.shape(),
            st[1].1.shape(),
            st[2].1.shape()
        )
    }
    Ok((rows, v, k))
}

fn fwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(op: &TopkFwd, st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let (rows, v, k) = sizes(&st, 0)?;
    let z = view::<T>(st[0].0, st[0].1, "student logits")?;
    let ids = view::<u32>(st[1].0, st[1].1, "teacher ids")?;
    let lpt = view::<A>(st[2].0, st[2].1, "teacher log-probs")?;
    let out = output::<A>(dev, rows * COLS)?;
    let (v_arg, k_arg, tail, inv_t) = (width(v)?, width(k)?, tail_code(op.tail), op.inv_t);
    let func = kernel("topk_fwd", st[0].0.dtype())?;
    launch!(
        dev,
        TOPK_DIVERGENCE,
        func,
        rows_config(rows, v)?,
        [&z, &ids, &lpt, &out, &v_arg, &k_arg, &tail, &inv_t, &EPS]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `(student logits, u32 ids, log-probs packed with (D, lse, c1, c2, g))`.
pub(super) fn bwd(op: &TopkBwd, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    let out = by_float_dtype!(st[0].0.dtype(), "fused-topk-kl-grad", bwd_typed(op, st))?;
    Ok((out, st[0].1.shape().clone()))
}

fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(op: &TopkBwd, st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let (rows, v, k) = sizes(&st, COLS + 1)?;
    let z = view::<T>(st[0].0, st[0].1, "student logits")?;
    let ids = view::<u32>(st[1].0, st[1].1, "teacher ids")?;
    let packed = view::<A>(st[2].0, st[2].1, "saved row statistics")?;
    let grad = output::<T>(dev, rows * v)?;
    let (v_arg, k_arg, tail, inv_t) = (width(v)?, width(k)?, tail_code(op.tail), op.inv_t);
    let func = kernel("topk_bwd", st[0].0.dtype())?;
    launch!(
        dev,
        TOPK_DIVERGENCE,
        func,
        rows_config(rows, v)?,
        [&z, &ids, &packed, &grad, &v_arg, &k_arg, &tail, &inv_t]
    );
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
}
