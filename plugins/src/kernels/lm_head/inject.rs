//! The graph node of a fused loss: its value and its gradients were computed in one go (by
//! [`super::fused_loss`]); the node hands out the value forward and the gradients, times the
//! incoming one, backward. Attached to the head's input and weight, or to the input only when
//! the caller takes the weight's gradient itself ([`super::WeightGradient::Returned`]).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// `L(hidden, weight)` with `dL/dhidden` and `dL/dweight` known.
pub struct Precomputed {
    /// The value, rank 0, in the dtype and on the device of `hidden`.
    pub value: Tensor,
    /// `dL/dhidden`, shaped as `hidden`.
    pub grad_hidden: Tensor,
    /// `dL/dweight`, shaped as `weight`; `None` when the node is attached to `hidden` only.
    pub grad_weight: Option<Tensor>,
}

impl Precomputed {
    /// The node, attached to `hidden`, and to `weight` when `grad_weight` is given.
    pub fn attach(self, hidden: &Tensor, weight: &Tensor) -> Result<Tensor> {
        match self.grad_weight {
            Some(_) => hidden.apply_op2(weight, self),
            None => hidden.apply_op1(self),
        }
    }

    /// The value's storage, cloned, on the CPU.
    fn cpu_value(&self) -> Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, Shape::from(()))),
            _ => bail!("fused-lm-head-loss: the value is not on the CPU"),
        }
    }

    /// The value's storage, cloned, on a CUDA device.
    #[cfg(feature = "cuda")]
    fn cuda_value(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, Shape::from(()))),
            _ => bail!("fused-lm-head-loss: the value is not on a CUDA device"),
        }
    }
}

/// `g * grad` for the rank-0 incoming gradient `g` (no copy when `g` is exactly 1).
fn scaled(grad: &Tensor, g: &Tensor) -> Result<Tensor> {
    let factor = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    if factor == 1.0 {
        return Ok(grad.clone());
    }
    grad.broadcast_mul(&g.to_dtype(grad.dtype())?)
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        "fused-lm-head-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_weight = self.grad_weight.as_ref().map(|w| scaled(w, g)).transpose()?;
        Ok((Some(scaled(&self.grad_hidden, g)?), grad_weight))
    }
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "fused-lm-head-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(scaled(&self.grad_hidden, g)?))
    }
}
