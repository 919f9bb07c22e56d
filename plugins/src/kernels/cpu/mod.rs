//! What only the CPU implementations use: the shared plumbing of the ops' `cpu.rs` files and
//! the strategies that are CPU-only by design (a GPU would not run them the same way).
//!
//! - [`fastmath`]: the [`Real`](fastmath::Real) element trait (f32 / f64) and branch-free
//!   `exp`/`ln`/`tanh` and lane-wise reductions that vectorise;
//! - [`rows`]: contiguous slices out of candle's CPU storage, the dtype dispatch, rows spread
//!   over the rayon pool;
//! - `raw`: the only code of the kernels that opts out of the compiler's memory-safety checks
//!   (AVX-512 intrinsics and their run-time dispatch, uninitialised outputs, slice casts, the
//!   `gemm` crate and BLAS calls), each such block with the reason it is sound;
//! - CPU-only strategies: [`linear`] (the linear layer on the `gemm` crate, operands' strides
//!   read in place), [`embedding`] (the lookup whose backward scatters into the table's
//!   gradient in place), [`gpt2_block`] (the whole GPT-2 block as one node), [`bf16_matmul`] (frozen weights in bf16,
//!   multiplied on the AMX tiles where the CPU has them), and with the `blas`
//!   feature `blas_matmul` (matmul through the system BLAS).

pub mod bf16_matmul;
#[cfg(feature = "blas")]
pub mod blas_matmul;
pub mod embedding;
pub mod fastmath;
pub mod few_rows;
pub mod gpt2_block;
pub mod linear;
pub mod quant;
pub(crate) mod raw;
pub mod rows;
