//! The CPU GELU: chunks of 16,384 elements on the rayon pool, the AVX-512 build of the loop or,
//! for f32, the intrinsics of `cpu_avx512.rs` where the CPU has them.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

use super::{A, C};
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::{as_f32, as_f32_mut, avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, slice};

/// Elements per work item on the rayon pool.
const CHUNK: usize = 16_384;

/// The forward over a storage.
pub(super) fn fwd(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let out = by_dtype(
        "fused-gelu",
        &[s],
        || Ok(f32::storage(fwd_typed(slice::<f32>(s, l, "gelu input")?))),
        || Ok(f64::storage(fwd_typed(slice::<f64>(s, l, "gelu input")?))),
    )?;
    Ok((out, l.shape().clone()))
}

/// The backward from the input `x` (`s1`) and the incoming gradient (`s2`).
pub(super) fn bwd(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let out = by_dtype(
        "fused-gelu-grad",
        &[s1, s2],
        || {
            Ok(f32::storage(bwd_typed(
                slice::<f32>(s1, l1, "x")?,
                slice::<f32>(s2, l2, "grad")?,
            )))
        },
        || {
            Ok(f64::storage(bwd_typed(
                slice::<f64>(s1, l1, "x")?,
                slice::<f64>(s2, l2, "grad")?,
            )))
        },
    )?;
    Ok((out, l1.shape().clone()))
}

#[inline(always)]
fn fwd_one<T: Real>(x: T) -> T {
    let (c, a, h) = (T::from_f64(C), T::from_f64(A), T::from_f64(0.5));
    let u = c * (x + a * x * x * x);
    h * x * (T::ONE + u.tanh())
}

#[inline(always)]
fn grad_one<T: Real>(x: T) -> T {
    let (c, a, h) = (T::from_f64(C), T::from_f64(A), T::from_f64(0.5));
    let x2 = x * x;
    let th = (c * (x + a * x2 * x)).tanh();
    h * (T::ONE + th) + h * x * (T::ONE - th * th) * c * (T::ONE + T::from_f64(3.0) * a * x2)
}

#[inline(always)]
fn fwd_chunk<T: Real>(o: &mut [T], x: &[T]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = fwd_one(x);
    }
}

#[inline(always)]
fn bwd_chunk<T: Real>(o: &mut [T], x: &[T], g: &[T]) {
    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
        *o = g * grad_one(x);
    }
}

avx512_dispatch!(fn fwd_chunk_generic<T: Real>(o: &mut [T], x: &[T]) => fwd_chunk);
avx512_dispatch!(fn bwd_chunk_generic<T: Real>(o: &mut [T], x: &[T], g: &[T]) => bwd_chunk);
avx512_dispatch!(fn fwd_chunk_f32(o: &mut [f32], x: &[f32]) => super::cpu_avx512::fwd, else fwd_chunk::<f32>);
avx512_dispatch!(fn bwd_chunk_f32(o: &mut [f32], x: &[f32], g: &[f32]) => super::cpu_avx512::bwd, else bwd_chunk::<f32>);

fn fwd_chunk_any<T: Real>(o: &mut [T], x: &[T]) {
    if let (Some(o), Some(x)) = (as_f32_mut(o), as_f32(x)) {
        return fwd_chunk_f32(o, x);
    }
    fwd_chunk_generic(o, x)
}

fn bwd_chunk_any<T: Real>(o: &mut [T], x: &[T], g: &[T]) {
    if let (Some(o), Some(x), Some(g)) = (as_f32_mut(o), as_f32(x), as_f32(g)) {
        return bwd_chunk_f32(o, x, g);
    }
    bwd_chunk_generic(o, x, g)
}

/// GELU of every element of `x` (on slices, for ops that fuse several layers).
pub(crate) fn fwd_typed<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = output_vec(x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| fwd_chunk_any(o, x));
    out
}

/// `g * gelu'(x)` element by element (on slices).
pub(crate) fn bwd_typed<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = output_vec(x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| bwd_chunk_any(o, x, g));
    out
}
