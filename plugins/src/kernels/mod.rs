//! Fused kernels as candle `CustomOp`s with a real backward: the logit-distillation losses
//! ([`divergence`], [`topk_divergence`], [`cross_entropy`]), the transformer's causal
//! [`attention`], [`softmax`], [`layer_norm`], [`rms_norm`], [`gelu`], [`swiglu`], the rotary
//! position embedding [`rope`] and the linear layers' [`bias`] add, and the optimizer's
//! [`adamw`] update.
//!
//! candle composes a KD loss out of a dozen full-size `[tokens, vocab]` temporaries; the kernels
//! here make one or two passes over each row instead (max / log-sum-exp / divergence, then the
//! gradient), accumulate in f64, and run rows in parallel on the rayon pool.
//!
//! # The map
//!
//! One folder per op, each laid out the same way (and `cuda.rs` + `<op>.cu` where the op has a
//! CUDA implementation, see below):
//!
//! - `mod.rs`: the op's formula and gradient, its public entry functions, its `SUPPORT` table
//!   and `supports(...)`, the op's `CustomOp` impls (the graph node: `name`, `bwd`, and one
//!   `*_fwd` per device), and the dispatch: the fused op where `supports` says yes, else the
//!   composite. Models and losses call the entry function and never choose themselves.
//! - `composite.rs`: the same op composed of candle ops (device-generic, differentiable by
//!   candle): the path off the supported devices and dtypes, what terms with `fused = false`
//!   call, and the reference the tests compare against.
//! - `cpu.rs`: the CPU implementation (`cpu_fwd`'s body: the row loops on the rayon pool);
//!   `cpu_avx512.rs`, where an op has one: its f32 rows in AVX-512 intrinsics.
//! - `tests.rs`: the fused op against the composite of the same folder.
//!
//! [`cpu`] holds what only the CPU implementations use: `fastmath` and `rows` (shared
//! plumbing); `raw`, the only code that opts out of the compiler's memory-safety checks
//! (AVX-512 intrinsics and the one macro that enters them, uninitialised outputs, slice casts,
//! the `gemm` and BLAS calls; a test keeps it there); and the strategies that are CPU-only by
//! design: `linear` (the `gemm` crate with the operands' strides), `gpt2_block` (the whole
//! GPT-2 block as one node) and `blas_matmul` (feature `blas`). `adamw` is no graph node (an
//! optimizer step is not differentiated): its `mod.rs` picks the implementation itself.
//!
//! # SIMD, one way
//!
//! Every entry into AVX-512 code goes through `avx512_dispatch!` (in `cpu/raw/`), which checks
//! the CPU at run time: either a generic row loop compiled a second time for AVX-512, or, for
//! the f32 rows LLVM cannot make fast, the op's `cpu_avx512.rs`: `#[target_feature]` functions
//! of intrinsics built from `raw::avx512`'s helpers (`exp_ps`, `ln_ps`, bounds-checked masked
//! loads, streaming stores...), with the generic rows as the fallback they must agree with.
//!
//! # Supports
//!
//! Each op states what its fused implementations run on in a [`Support`] table (e.g.
//! `SUPPORT: Support { cpu: &[F32, F64], cuda: CUDA_FLOATS }`) and checks anything else it
//! needs in `supports` (e.g. operands of one dtype on one device). Where an op is not
//! supported it runs its composite, so every op works on every device candle has.
//!
//! # CUDA (feature `cuda`)
//!
//! Every op has a CUDA implementation: the loss ops (`divergence`, `topk_divergence`,
//! `cross_entropy`), `adamw`, the row ops (`rms_norm`, `layer_norm`, `swiglu`, `gelu`, `bias`,
//! `softmax`), `rope` and the causal `attention` (FlashAttention-2 style, no `[T, T]` in
//! memory). In the op's folder, `<op>.cu` (the kernels, compiled to `compute_80` PTX by
//! `plugins/build.rs`) and `cuda.rs` (the launch: operand views, output buffers, grid), and in
//! `mod.rs` a `cuda_fwd` beside `cpu_fwd`; `cuda/` holds the PTX modules, the shared device
//! code (`common.cuh`: conversions, fixed-order reductions, online log-sum-exp, column sums)
//! and the launch itself (`cuda/raw.rs`, the only raw code of the CUDA side); `grid.rs` the
//! launch shapes. On CUDA, half-precision inputs keep their row statistics in f32
//! ([`stats_dtype`]). The weight and bias gradients (sums over rows) are per-slice column sums
//! then a second kernel summing the slices in order (`column_partials` / `column_finish` of
//! `common.cuh`, `grid::SLICE_ROWS` rows a slice), and the attention's `dq` has a kernel of its
//! own beside `dk`/`dv`: deterministic, no atomics anywhere.
//!
//! Feature `cuda-emulate` (tests only) compiles the same `.cu` files as C++ for the CPU
//! (`cuda/emulate.h`, launched through `emulated/`): each op's `cuda_emulated.rs` runs its
//! kernels there against its CPU implementation.

pub mod adamw;
pub mod attention;
pub mod bias;
pub mod cpu;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod divergence;
#[cfg(all(test, feature = "cuda-emulate"))]
pub(crate) mod emulated;
pub mod gelu;
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
pub(crate) mod grid;
pub mod layer_norm;
pub mod leaf_grads;
pub mod lm_head;
pub mod rms_norm;
pub mod rope;
pub mod selftest;
pub mod softmax;
mod support;
pub mod swiglu;
pub mod topk_divergence;

pub use support::{stats_dtype, Support, CUDA_FLOATS};

#[cfg(test)]
mod tests;

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
