//! What an op's fused implementation runs on: [`Support`].

use candle_core::{DType, Tensor};

/// The dtypes of the CUDA implementations of the loss kernels (in a build with the `cuda`
/// feature; none without it).
#[cfg(feature = "cuda")]
pub const CUDA_FLOATS: &[DType] = &[DType::F32, DType::F64, DType::F16, DType::BF16];
/// The dtypes of the CUDA implementations of the loss kernels (none: no `cuda` feature).
#[cfg(not(feature = "cuda"))]
pub const CUDA_FLOATS: &[DType] = &[];

/// The dtype of a fused op's per-row statistics (and of its other real-valued inputs, such as
/// teacher log-probs) for operands of `dtype`: f64 for f64, f32 otherwise (half-precision
/// logits keep their row statistics in f32).
pub fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The dtypes an op's fused implementation takes on each device kind: every op's `SUPPORT`
/// table (one line), which its `supports` reads. Off the table the op runs its composite. A
/// CUDA implementation of an op adds the dtypes its `cuda_fwd` takes to that op's `cuda` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    /// Dtypes of the CPU implementation (`cpu_fwd`, the op's `cpu.rs`).
    pub cpu: &'static [DType],
    /// Dtypes of the CUDA implementation (`cuda_fwd`, the op's `cuda.rs`); empty while there
    /// is none.
    pub cuda: &'static [DType],
}

impl Support {
    /// Whether `t`'s device kind and dtype are in the table.
    pub fn admits(&self, t: &Tensor) -> bool {
        let dtypes = if t.device().is_cpu() {
            self.cpu
        } else if t.device().is_cuda() {
            self.cuda
        } else {
            &[]
        };
        dtypes.contains(&t.dtype())
    }

    /// Whether `first` is admitted and every tensor of `rest` has its dtype and lies on its
    /// device (the operands of one fused call).
    pub fn admits_together(&self, first: &Tensor, rest: &[&Tensor]) -> bool {
        self.admits(first)
            && rest
                .iter()
                .all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()))
    }
}
