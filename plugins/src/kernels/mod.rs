//! Fused CPU kernels as candle `CustomOp`s with a real backward: the logit-distillation losses
//! (`divergence`, `topk`, `cross_entropy`) and the transformer's causal `attention`, `softmax`,
//! `layer_norm`, `gelu` and the linear layers' `bias` add (and, with the `blas` feature, `matmul`).
//!
//! candle composes a KD loss out of a dozen full-size `[tokens, vocab]` temporaries; the kernels
//! here make one or two passes over each row instead (max / log-sum-exp / divergence, then the
//! gradient), accumulate in f64, and run rows in parallel on the rayon pool. Each kernel's doc
//! comment gives its formula and gradient; each is tested against the composite implementation
//! it replaces, which stays available as the reference (`fused = false` on the terms).
//!
//! Only a CPU implementation exists: [`fusable`] says whether a tensor can take the fused path,
//! and callers fall back to the composite (device-generic) ops otherwise, e.g. on CUDA.

pub mod attention;
pub mod bias;
pub mod cross_entropy;
pub mod divergence;
pub mod fastmath;
pub mod gelu;
pub mod layer_norm;
#[cfg(feature = "blas")]
pub mod matmul;
pub mod rows;
pub mod softmax;
pub mod topk;

use candle_core::{DType, Tensor};

/// Whether the fused kernels can run on `t`: an f32 or f64 tensor on the CPU.
pub fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}
