//! The CPU RoPE: rows of `x` (one position of one head each) on the rayon pool, tiny rows
//! batched into larger work items; each row in the AVX-512 build of the loop where the CPU has
//! it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

use super::{sizes, RopeOp};
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::{avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, for_rows, slice};

/// The rotation (or, for the backward op, its inverse) on `(x, cos, sin)`.
pub(super) fn fwd(op: &RopeOp, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        op.name(),
        &[st[0].0, st[1].0, st[2].0],
        || fwd_typed::<f32>(op, st),
        || fwd_typed::<f64>(op, st),
    )
}

/// One row, pairs half-split: `o[i], o[i + h]` from `x[i], x[i + h]` and `(c, s)[i]`.
#[inline(always)]
fn row_half<T: Real>(o: &mut [T], x: &[T], c: &[T], s: &[T]) {
    let h = c.len();
    let (o0, o1) = o.split_at_mut(h);
    let (x0, x1) = x.split_at(h);
    for i in 0..h {
        let (a, b) = (x0[i], x1[i]);
        o0[i] = a * c[i] - b * s[i];
        o1[i] = a * s[i] + b * c[i];
    }
}

/// One row, pairs interleaved: `o[2i], o[2i + 1]` from `x[2i], x[2i + 1]` and `(c, s)[i]`.
#[inline(always)]
fn row_interleaved<T: Real>(o: &mut [T], x: &[T], c: &[T], s: &[T]) {
    for (((o, x), &c), &s) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(c).zip(s) {
        let (a, b) = (x[0], x[1]);
        o[0] = a * c - b * s;
        o[1] = a * s + b * c;
    }
}

avx512_dispatch!(fn row_half_any<T: Real>(o: &mut [T], x: &[T], c: &[T], s: &[T]) => row_half);
avx512_dispatch!(fn row_interleaved_any<T: Real>(o: &mut [T], x: &[T], c: &[T], s: &[T]) => row_interleaved);

fn fwd_typed<T: Real>(op: &RopeOp, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let name = op.name();
    let (rows, t, half) = sizes(name, st[0].1, st[1].1, st[2].1)?;
    let x = slice::<T>(st[0].0, st[0].1, "x")?;
    let cos = slice::<T>(st[1].0, st[1].1, "cos")?;
    let sin = slice::<T>(st[2].0, st[2].1, "sin")?;
    // The backward rotates by the negated angles.
    let neg: Vec<T>;
    let sin = if op.inverse {
        neg = sin.iter().map(|&s| -s).collect();
        &neg[..]
    } else {
        sin
    };
    let d = 2 * half;
    let mut out = output_vec(rows * d);
    for_rows(&mut out, d, 2 * d, |r, o| {
        let p = (r % t) * half;
        let (x, c, s) = (&x[r * d..(r + 1) * d], &cos[p..p + half], &sin[p..p + half]);
        if op.interleaved {
            row_interleaved_any(o, x, c, s)
        } else {
            row_half_any(o, x, c, s)
        }
    });
    Ok((T::storage(out), st[0].1.shape().clone()))
}
