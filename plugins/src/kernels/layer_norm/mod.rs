//! Fused LayerNorm over the last dim (Ba, Kiros & Hinton, 2016) with backward for the input,
//! the weight and the bias.
//!
//! Per row of width `D`: `mu = mean x`, `r = 1 / sqrt(mean (x - mu)^2 + eps)`,
//! `xh = (x - mu) r`, `y = xh w + b`. Backward with `gy` the incoming gradient and
//! `gx_h = gy w`: `dx = r (gx_h - mean gx_h - xh mean(gx_h xh))`, `dw = sum_rows gy xh`,
//! `db = sum_rows gy`. Row sums lane-wise in the element type, f64 across blocks (as the other
//! kernels, see [`crate::kernels::cpu::fastmath::reduce2`]); the backward recomputes the row
//! statistics from `x` (rows are short) and reduces `dw`, `db` in f64 per block of rows before
//! summing the blocks. The row loops are compiled for AVX-512 where the CPU has it.
//!
//! On CUDA (`layer_norm.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): one block per row;
//! `dw` and `db` as per-slice column sums, then the slices summed in order (no atomics).

pub mod composite;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::Support;

/// Where the fused LayerNorm runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused LayerNorm runs on `x` with `weight` and `bias`.
pub fn supports(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    SUPPORT.admits_together(x, &[weight, bias])
}

/// LayerNorm over the last dim: `(x - mean) / sqrt(var + eps) * weight + bias`, `weight` and
/// `bias` `[D]`. The fused op where [`supports`], else [`composite::layer_norm`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if supports(x, weight, bias) {
        return fused(x, weight, bias, eps);
    }
    composite::layer_norm(x, weight, bias, eps)
}

/// The fused LayerNorm.
fn fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layer norm: weight {:?} and bias {:?} must be [{d}]",
            weight.dims(),
            bias.dims()
        )
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

struct LayerNormOp {
    eps: f64,
}

struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        // Output rows 0..rows: dx; row `rows`: dw; row `rows + 1`: db.
        let packed = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::bwd(self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(self.eps, [(s1, l1), (s2, l2), (s3, l3)])
    }
}
