//! Fused SwiGLU gate (Shazeer, 2020): `y = silu(g) u` with `silu(g) = g s`, `s = sigmoid(g)`,
//! the activation of llama's MLP, with backward
//! `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.
//!
//! One pass with the vectorised `exp` of `cpu::fastmath` instead of candle's `silu` and `mul`
//! (two nodes, each with its own zero-filled gradient in candle's backward); chunks spread over
//! the rayon pool; the backward recomputes `s` from `g`.
//!
//! On CUDA (`swiglu.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): element-wise
//! grid-stride kernels.

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::Support;

/// Where the fused SwiGLU runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused SwiGLU runs on the gate `g` and the up projection `u`.
pub fn supports(g: &Tensor, u: &Tensor) -> bool {
    SUPPORT.admits_together(g, &[u])
}

/// `silu(g) * u`: the fused op where [`supports`], else candle's `silu` and `mul`
/// ([`composite::swiglu`]).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if supports(g, u) {
        return fused(g, u);
    }
    composite::swiglu(g, u)
}

/// The fused `silu(g) * u` for `g`, `u` of one shape.
fn fused(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("swiglu: gate {:?} and up {:?} differ in shape", g.dims(), u.dims())
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;
struct SwiGluBwd;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
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

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        // `dg` then `du`, one after the other.
        let packed = g
            .detach()
            .apply_op3_no_bwd(&u.detach(), &dy.contiguous()?, &SwiGluBwd)?;
        let dg = packed.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
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
        cpu::bwd([(s1, l1), (s2, l2), (s3, l3)])
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
        cuda::bwd([(s1, l1), (s2, l2), (s3, l3)])
    }
}
