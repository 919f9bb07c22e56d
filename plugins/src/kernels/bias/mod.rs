//! Fused row-broadcast bias add with backward: `y = x + b` for `x` `[.., n]`, `b` `[n]`;
//! `dx = gy`, `db = sum_rows gy` (f64 within blocks of rows, blocks summed after).
//!
//! candle's `broadcast_add` backward reduces `gy` over the broadcast rows with a strided
//! `sum_keepdim`; this reduces contiguous rows instead, on the rayon pool.
//!
//! On CUDA (`bias.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): the add one block per row;
//! the row sums per slice of rows, then the slices summed in order (no atomics).

pub mod composite;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::Support;

/// Where the fused bias add runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused add runs on `x` and `bias`.
pub fn supports(x: &Tensor, bias: &Tensor) -> bool {
    SUPPORT.admits_together(x, &[bias])
}

/// `x + bias` with `bias` `[n]` broadcast over the rows of `x` `[.., n]`: the fused op where
/// [`supports`], else candle's `broadcast_add` ([`composite::add_bias`]).
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if supports(x, bias) {
        return fused(x, bias);
    }
    composite::add_bias(x, bias)
}

/// The fused add.
fn fused(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if bias.dims() != [n] {
        bail!("bias add: bias {:?} must be [{n}]", bias.dims())
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

struct BiasAdd;

/// The sum over rows of a `[.., n]` gradient: `[n]` (the bias gradient of this op and of the
/// fused linear layer).
pub(crate) struct SumRows;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, _x: &Tensor, _b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = g.contiguous()?.apply_op1_no_bwd(&SumRows)?;
        Ok((Some(g.clone()), Some(db)))
    }
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "fused-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::sum_rows(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::sum_rows(s, l)
    }
}
