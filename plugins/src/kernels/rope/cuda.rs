//! The CUDA RoPE: `rope.cu`, one thread per pair of `x` in a grid-stride loop ([`super::grid`]),
//! f32/f64/f16/bf16 storage (math in f32, f64 for f64).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, CustomOp3, DType, Layout, Result, Shape};

use super::{grid, sizes, RopeOp};
use crate::kernels::cuda::{config, kernel, launch, output, view, width, ROPE};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The rotation (or, for the backward op, its inverse) on `(x, cos, sin)`.
pub(super) fn fwd(op: &RopeOp, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    let out = match st[0].0.dtype() {
        DType::F32 => fwd_typed::<f32>(op, st),
        DType::F64 => fwd_typed::<f64>(op, st),
        DType::F16 => fwd_typed::<half::f16>(op, st),
        DType::BF16 => fwd_typed::<half::bf16>(op, st),
        other => bail!("{}: no CUDA kernel for {other:?}", op.name()),
    }?;
    Ok((out, st[0].1.shape().clone()))
}

/// The kernel for storage `T` (its math type, f32 or f64, is the kernel's own).
fn fwd_typed<T: CudaDType + DeviceRepr>(op: &RopeOp, st: [Arg; 3]) -> Result<CudaStorage> {
    let name = op.name();
    let dev = st[0].0.device();
    let (rows, t, half) = sizes(name, st[0].1, st[1].1, st[2].1)?;
    let x = view::<T>(st[0].0, st[0].1, "x")?;
    let cos = view::<T>(st[1].0, st[1].1, "cos")?;
    let sin = view::<T>(st[2].0, st[2].1, "sin")?;
    let pairs = rows * half;
    let out = output::<T>(dev, 2 * pairs)?;
    let (pairs_arg, half_arg, seq_arg) = (pairs as u64, width(half)?, width(t)?);
    let (interleaved, inverse) = (i32::from(op.interleaved), i32::from(op.inverse));
    let func = kernel("rope", st[0].0.dtype())?;
    launch!(
        dev,
        ROPE,
        func,
        config(grid(pairs)),
        [
            &x,
            &cos,
            &sin,
            &out,
            &pairs_arg,
            &half_arg,
            &seq_arg,
            &interleaved,
            &inverse
        ]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
