//! Fused GELU, tanh approximation (GPT-2's `gelu_new`; Hendrycks & Gimpel, 2016), with backward.
//!
//! `y = 0.5 x (1 + tanh u)`, `u = c (x + 0.044715 x^3)`, `c = sqrt(2 / pi)`;
//! `dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)`.
//!
//! One vectorised pass (the `tanh` of `cpu::fastmath`, or AVX-512 intrinsics for f32) instead
//! of candle's libm `tanh`, chunks spread over the rayon pool. The backward recomputes `tanh u`
//! from the input.
//!
//! On CUDA (`gelu.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): the same tanh
//! approximation, element-wise grid-stride kernels.

pub mod composite;
pub(crate) mod cpu;
#[cfg(target_arch = "x86_64")]
mod cpu_avx512;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::Support;

/// `sqrt(2 / pi)`.
const C: f64 = 0.797_884_560_802_865_4;
/// The cubic coefficient.
const A: f64 = 0.044_715;

/// Where the fused GELU runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused GELU runs on `x`.
pub fn supports(x: &Tensor) -> bool {
    SUPPORT.admits(x)
}

/// GELU (tanh approximation) of `x`: the fused op where [`supports`], else candle's `gelu`
/// ([`composite::gelu`]).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if supports(x) {
        return fused(x);
    }
    composite::gelu(x)
}

/// The fused GELU of `x`.
fn fused(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluFwd)
}

struct GeluFwd;
struct GeluBwd;

impl CustomOp1 for GeluFwd {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.detach().apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::bwd(s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(s1, l1, s2, l2)
    }
}
