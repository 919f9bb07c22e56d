//! Softmax over the last dim, optionally causal, with backward.
//!
//! `y_j = e^{x_j - m} / sum_k e^{x_k - m}` over the row; with `causal`, the rows are the query
//! positions of `[.., T, T]` scores and row `i` keeps columns `j <= i` only (the others get
//! probability 0 and no gradient), so no additive `-inf` mask tensor is needed.
//! Backward from the saved output: `dx_j = y_j (gy_j - sum_k gy_k y_k)`.
//!
//! On CUDA (`softmax.cu`, f32/f64/f16/bf16, math in f32, f64 for f64): one block per row, the
//! causal rows as on the CPU (row `r` keeps its first `r % T + 1` columns).

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

pub use composite::causal_mask;

use super::Support;

/// Where the fused softmax runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused softmax runs on `x`.
pub fn supports(x: &Tensor) -> bool {
    SUPPORT.admits(x)
}

/// `softmax(x)` over the last dim: the fused op where [`supports`], else
/// [`composite::softmax_last`].
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if supports(x) {
        return fused(x, false);
    }
    composite::softmax_last(x)
}

/// Causal attention probabilities from scores `[.., T, T]`: row `i` attends to `0..=i`. The
/// fused op where [`supports`] (no mask tensor is touched), else `softmax(scores + mask)` with
/// the additive mask `[T, T]` of [`causal_mask`].
pub fn causal_softmax(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if supports(scores) {
        return fused(scores, true);
    }
    composite::causal_softmax(scores, mask)
}

/// The fused softmax over the last dim of `x`; with `causal`, `x` is `[.., T, T]` and row `i`
/// of every `T x T` matrix attends to columns `0..=i`.
fn fused(x: &Tensor, causal: bool) -> Result<Tensor> {
    if causal {
        let d = x.dims();
        if d.len() < 2 || d[d.len() - 1] != d[d.len() - 2] {
            bail!("causal softmax: expected [.., T, T] scores, got {d:?}")
        }
    }
    x.contiguous()?.apply_op1(SoftmaxOp { causal })
}

struct SoftmaxOp {
    causal: bool,
}

struct SoftmaxBwd;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(self.causal, s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self.causal, s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.detach().apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
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
