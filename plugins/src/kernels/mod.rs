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

/// `avx512_dispatch!(name, name_avx512, inner, (args))` defines `name` with the signature of
/// the generic `inner<T: Real>(args)`, which runs a copy of `inner` compiled with AVX-512 (F,
/// DQ), AVX2 and FMA enabled when the CPU has them (checked at run time, cached by std), and
/// the baseline build otherwise. `inner` and what it calls should be `#[inline(always)]` so
/// that the loops are generated inside the AVX-512 copy. The crate targets baseline x86-64
/// (SSE2); this widens the row loops without `-C target-cpu=native`.
macro_rules! avx512_dispatch {
    ($name:ident, $avx:ident, $inner:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        fn $avx<T: Real>($($arg: $ty),*) {
            $inner($($arg),*)
        }

        /// Runs the AVX-512 build of the loop where the CPU has it.
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports every feature the function was compiled for.
                #[allow(unsafe_code)]
                return unsafe { $avx($($arg),*) };
            }
            $inner($($arg),*)
        }
    };
}

pub mod adamw;
pub mod attention;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub mod bias;
pub mod block;
pub mod cross_entropy;
pub mod divergence;
pub mod fastmath;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
#[cfg(feature = "blas")]
pub mod matmul;
pub mod rms_norm;
pub mod rows;
pub mod softmax;
pub mod swiglu;
pub mod topk;

use candle_core::{DType, Tensor};

/// Whether the fused kernels can run on `t`: an f32 or f64 tensor on the CPU.
pub fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Helpers shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Tensor};

    /// All elements of `t` as f64, flattened.
    pub fn values(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    }
}
