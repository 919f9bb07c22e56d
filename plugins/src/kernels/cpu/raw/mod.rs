//! All of the kernels' `unsafe` code, each block with the reason it is sound:
//!
//! - [`avx512`]: the AVX-512 intrinsic helpers (`exp_ps`, `ln_ps`, `recip_ps`, masked loads,
//!   streaming stores, prefetches, the attention's register-blocked product) and
//!   [`avx512_dispatch!`], the one way the kernels enter code compiled for AVX-512;
//! - [`output_vec`], the uninitialised output vector, and [`as_f32`] / [`as_f32_mut`], the
//!   `&[T] -> &[f32]` casts of the f32-only fast paths;
//! - [`amx`]: the Intel AMX tile products of packed bf16 weights (inline assembly) and the
//!   check that the CPU and the kernel allow them;
//! - [`gemm`]: the `gemm` crate's raw-pointer product over checked strided views;
//! - `blas` (feature `blas`): the CBLAS declarations of the system BLAS.
//!
//! What leaves this folder is safe: functions whose contract is checked inside (or, for the
//! `#[target_feature]` helpers, that are only callable from code compiled for those features),
//! and the dispatch macro. No other file under `kernels/` may write `unsafe` (a test in
//! `kernels/tests.rs` reads the sources to make sure).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(feature = "blas")]
pub mod blas;
mod dispatch;
pub mod gemm;
mod slices;

pub(crate) use dispatch::avx512_dispatch;
pub use slices::{as_f32, as_f32_mut, output_vec};
