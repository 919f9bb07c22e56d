//! Fused RMSNorm over the last dim (Zhang & Sennrich, 2019) with backward for the input and
//! the weight.
//!
//! Per row of width `D`: `r = 1 / sqrt(mean x^2 + eps)`, `xh = x r`, `y = xh w`. Backward with
//! `gy` the incoming gradient and `gh = gy w`: `dx = r (gh - xh mean(gh xh))`,
//! `dw = sum_rows gy xh`. Row statistics in f64; the backward recomputes `r` from `x` and
//! reduces `dw` per block of rows before summing the blocks. Replaces the six-node composite
//! (`sqr`, `mean`, `+ eps`, `sqrt`, `div`, `mul`), each of whose gradients candle would
//! zero-fill and add into.
//!
//! On CUDA (`rms_norm.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): one block per row;
//! `dw` as per-slice column sums, then the slices summed in order (no atomics).

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::Support;

/// Where the fused RMSNorm runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused RMSNorm runs on `x` with `weight`.
pub fn supports(x: &Tensor, weight: &Tensor) -> bool {
    SUPPORT.admits_together(x, &[weight])
}

/// RMSNorm over the last dim: `x / sqrt(mean(x^2) + eps) * weight`, `weight` `[D]`. The fused
/// op where [`supports`], else [`composite::rms_norm`] (candle's `ops::rms_norm` has no
/// backward).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if supports(x, weight) {
        return fused(x, weight, eps);
    }
    composite::rms_norm(x, weight, eps)
}

/// The fused RMSNorm.
fn fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        bail!("rms norm: weight {:?} must be [{d}]", weight.dims())
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps })
}

struct RmsNormOp {
    eps: f64,
}

struct RmsNormBwd {
    eps: f64,
    /// The forward's weight (the backward op's arguments are `x` and `gy`).
    weight: Tensor,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(self.eps, s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self.eps, s1, l1, s2, l2)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        // Output rows 0..rows: dx; row `rows`: dw.
        let op = RmsNormBwd {
            eps: self.eps,
            weight: w.detach(),
        };
        let packed = x.detach().apply_op2_no_bwd(&g.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::bwd(self.eps, &self.weight, s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(self.eps, &self.weight, s1, l1, s2, l2)
    }
}
