//! The CPU SwiGLU: chunks of 16,384 elements on the rayon pool, in the AVX-512 build of the
//! loop where the CPU has it.

use candle_core::{CpuStorage, Layout, Result, Shape};
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::{avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, slice};

/// Elements per work item on the rayon pool.
const CHUNK: usize = 16_384;

/// The forward on the gate (`s1`) and up (`s2`) storages.
pub(super) fn fwd(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-swiglu",
        &[s1, s2],
        || fwd_typed::<f32>(s1, l1, s2, l2),
        || fwd_typed::<f64>(s1, l1, s2, l2),
    )
}

/// The backward on `(g, u, dy)`: `dg` then `du`, one flat vector.
pub(super) fn bwd(st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-swiglu-grad",
        &[st[0].0],
        || bwd_typed::<f32>(st),
        || bwd_typed::<f64>(st),
    )
}

#[inline(always)]
fn sigmoid<T: Real>(g: T) -> T {
    T::ONE / (T::ONE + (-g).exp())
}

#[inline(always)]
fn fwd_chunk<T: Real>(o: &mut [T], g: &[T], u: &[T]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

/// `o` holds `dg` for the chunk, `o2` `du`.
#[inline(always)]
fn bwd_chunk<T: Real>(o: &mut [T], o2: &mut [T], g: &[T], u: &[T], dy: &[T]) {
    for ((((o, o2), &g), &u), &dy) in o.iter_mut().zip(o2.iter_mut()).zip(g).zip(u).zip(dy) {
        let s = sigmoid(g);
        *o = dy * u * s * (T::ONE + g * (T::ONE - s));
        *o2 = dy * g * s;
    }
}

avx512_dispatch!(fn fwd_chunk_any<T: Real>(o: &mut [T], g: &[T], u: &[T]) => fwd_chunk);
avx512_dispatch!(fn bwd_chunk_any<T: Real>(o: &mut [T], o2: &mut [T], g: &[T], u: &[T], dy: &[T]) => bwd_chunk);

fn fwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (g, u) = (slice::<T>(s1, l1, "gate")?, slice::<T>(s2, l2, "up")?);
    let mut out = output_vec(g.len());
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| fwd_chunk_any(o, g, u));
    Ok((T::storage(out), l1.shape().clone()))
}

fn bwd_typed<T: Real>(st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(st[0].0, st[0].1, "gate")?;
    let u = slice::<T>(st[1].0, st[1].1, "up")?;
    let dy = slice::<T>(st[2].0, st[2].1, "grad")?;
    let n = g.len();
    let mut out = output_vec(2 * n);
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((o, o2), ((g, u), dy))| bwd_chunk_any(o, o2, g, u, dy));
    Ok((T::storage(out), Shape::from(2 * n)))
}
