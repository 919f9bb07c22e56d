//! Fused per-token cross-entropy with label smoothing, with its gradient w.r.t. the logits.
//!
//! Per row with logits `z` `[V]`, label `y`, `lse = ln sum_v e^{z_v}`:
//! `L = (1 - eps) (lse - z_y) + eps (lse - mean_v z_v)`,
//! `dL/dz_u = softmax(z)_u - (1 - eps) [u = y] - eps / V`.
//!
//! Forward: one pass for the max, one for `sum e^{z - max}` and `sum z`; output `[.., 2]` =
//! `(L, lse)`. Backward: one sweep writing `g * dL/dz`. Sums in f64, rows in parallel.

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{leaf_grads, Support};

/// Where the fused cross-entropy runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused cross-entropy runs on `logits` (the targets are integer ids, taken as
/// `u32`).
pub fn supports(logits: &Tensor) -> bool {
    SUPPORT.admits(logits)
}

/// Per-token cross-entropy `[..]` of `logits` `[.., V]` against `targets` `[..]` (integer ids),
/// smoothed by `eps`, differentiable w.r.t. the logits: the fused op where [`supports`], else
/// [`composite::per_token`].
pub fn per_token(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    if supports(logits) {
        return fused(logits, targets, eps);
    }
    composite::per_token(logits, targets, eps)
}

/// The fused per-token cross-entropy.
fn fused(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let z = logits.contiguous()?;
    let y = targets.to_dtype(DType::U32)?.contiguous()?;
    if z.dims()[..z.rank().saturating_sub(1)] != *y.dims() {
        bail!(
            "cross-entropy: logits {:?} and targets {:?} disagree",
            z.dims(),
            y.dims()
        )
    }
    let out = z.apply_op2(&y, CeFwd { eps })?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

/// Columns of the forward's output: `(L, lse)` per row.
const COLS: usize = 2;

struct CeFwd {
    eps: f64,
}

struct CeBwd {
    eps: f64,
}

impl CustomOp2 for CeFwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
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

    fn bwd(&self, z: &Tensor, y: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.narrow(D::Minus1, 0, 1)?;
        let aux = Tensor::cat(&[&res.detach(), &g], D::Minus1)?.contiguous()?;
        let gz = z.detach().apply_op3_no_bwd(y, &aux, &CeBwd { eps: self.eps })?;
        Ok((leaf_grads::hand_over(z, gz)?, None))
    }
}

impl CustomOp3 for CeBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
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
