//! The CPU AdamW update and the gradients' sums of squares: chunks of 16,384 elements on the
//! rayon pool (the update in the parameter's element type, the sums in f64 added in chunk
//! order).
//!
//! The update runs in place: `m`, `v` and `w` are each locked for writing through candle's
//! in-place ops, nested (`m`, then `v`, then `w` with `g` read), so the step allocates nothing
//! and touches each element of the four tensors once.

use std::cell::RefCell;

use candle_core::{bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::AdamWStep;
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::rows::{slice, slice_mut};

/// `(w', m', v')` of one step on contiguous CPU tensors of one f32/f64 dtype and size, as new
/// tensors (the inputs are left as they are).
pub(super) fn update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    let (w, m, v) = (w.copy()?, m.copy()?, v.copy()?);
    update_in_place(&w, g, &m, &v, s)?;
    Ok((w, m, v))
}

/// One step in place: `w`, `m` and `v` are overwritten, `g` is read. Contiguous CPU tensors of
/// one f32/f64 dtype and size; `w`, `m` and `v` must not share a storage (`g` may not share
/// one with any of them either).
pub(super) fn update_in_place(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<()> {
    match w.dtype() {
        DType::F32 => m.inplace_op1(&FirstMoment::<f32> {
            w,
            g,
            v,
            s,
            t: Default::default(),
        }),
        DType::F64 => m.inplace_op1(&FirstMoment::<f64> {
            w,
            g,
            v,
            s,
            t: Default::default(),
        }),
        other => bail!("fused adamw: unsupported dtype {other:?}"),
    }
}

/// Holds `m` writable, then locks `v` ([`SecondMoment`]).
struct FirstMoment<'a, T> {
    w: &'a Tensor,
    g: &'a Tensor,
    v: &'a Tensor,
    s: AdamWStep,
    t: std::marker::PhantomData<T>,
}

/// Holds `m` and `v` writable, then locks `w` for writing and `g` for reading ([`Weights`]).
struct SecondMoment<'a, 'm, T> {
    w: &'a Tensor,
    g: &'a Tensor,
    m: RefCell<Option<&'m mut [T]>>,
    s: AdamWStep,
}

/// The update itself, with both moments in hand.
struct Weights<'m, 'v, T> {
    m: RefCell<Option<&'m mut [T]>>,
    v: RefCell<Option<&'v mut [T]>>,
    s: AdamWStep,
}

impl<T: Real> InplaceOp1 for FirstMoment<'_, T> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, ml: &Layout) -> Result<()> {
        let m = slice_mut::<T>(m, ml, "adamw first moment")?;
        self.v.inplace_op1(&SecondMoment {
            w: self.w,
            g: self.g,
            m: RefCell::new(Some(m)),
            s: self.s,
        })
    }
}

impl<T: Real> InplaceOp1 for SecondMoment<'_, '_, T> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, v: &mut CpuStorage, vl: &Layout) -> Result<()> {
        let v = slice_mut::<T>(v, vl, "adamw second moment")?;
        self.w.inplace_op2(
            self.g,
            &Weights {
                m: RefCell::new(self.m.borrow_mut().take()),
                v: RefCell::new(Some(v)),
                s: self.s,
            },
        )
    }
}

impl<T: Real> InplaceOp2 for Weights<'_, '_, T> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, wl: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let w = slice_mut::<T>(w, wl, "adamw parameter")?;
        let g = slice::<T>(g, gl, "adamw gradient")?;
        let (Some(m), Some(v)) = (self.m.borrow_mut().take(), self.v.borrow_mut().take()) else {
            bail!("fused adamw: the moments were already consumed")
        };
        if [g.len(), m.len(), v.len()] != [w.len(); 3] {
            bail!(
                "fused adamw: w has {} elements, g {}, m {}, v {}",
                w.len(),
                g.len(),
                m.len(),
                v.len()
            )
        }
        let k = Scalars::new(self.s);
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| k.apply(w, g, m, v));
        Ok(())
    }
}

/// Elements per work item on the rayon pool.
const CHUNK: usize = 16_384;

/// The step's scalars in the element type.
struct Scalars<T> {
    b1: T,
    b2: T,
    one_b1: T,
    one_b2: T,
    bc1: T,
    bc2: T,
    eps: T,
    lr: T,
    scale: T,
    keep: T,
}

impl<T: Real> Scalars<T> {
    fn new(s: AdamWStep) -> Self {
        let c = |x: f64| T::from_f64(x);
        Scalars {
            b1: c(s.beta1),
            b2: c(s.beta2),
            one_b1: c(1.0 - s.beta1),
            one_b2: c(1.0 - s.beta2),
            bc1: c(s.bias_correction1),
            bc2: c(s.bias_correction2),
            eps: c(s.eps),
            lr: c(s.lr),
            scale: c(s.grad_scale),
            keep: c(1.0 - s.lr * s.weight_decay),
        }
    }

    /// One chunk (equal lengths). Scaling by 1 is exact, so no clipping or no decay needs no
    /// branch.
    #[inline]
    fn apply(&self, w: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
        let n = w.len();
        let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let g = g[i] * self.scale;
            let mi = m[i] * self.b1 + g * self.one_b1;
            let vi = v[i] * self.b2 + g * g * self.one_b2;
            let update = (mi / self.bc1) / ((vi / self.bc2).sqrt() + self.eps);
            w[i] = w[i] * self.keep - update * self.lr;
            m[i] = mi;
            v[i] = vi;
        }
    }
}

/// `sum(x^2)` of each of `xs` (contiguous CPU f32/f64 tensors) in f64.
pub(super) fn sum_squares(xs: &[Tensor]) -> Result<Vec<f64>> {
    xs.iter()
        .map(|x| match x.dtype() {
            DType::F32 => typed_sum_squares::<f32>(x),
            DType::F64 => typed_sum_squares::<f64>(x),
            other => bail!("sum of squares: unsupported dtype {other:?}"),
        })
        .collect()
}

fn typed_sum_squares<T: Real + WithDType>(x: &Tensor) -> Result<f64> {
    let (st, l) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*st else {
        bail!("sum of squares: expected a CPU tensor")
    };
    let xs = slice::<T>(cpu, l, "sum of squares operand")?;
    let partial: Vec<f64> = xs.par_chunks(CHUNK).map(chunk_sum_squares).collect();
    Ok(partial.iter().sum())
}

/// `sum(x^2)` of a chunk in f64: eight running sums (lane `j` takes elements `j mod 8`, so
/// the loop vectorises) added in a fixed order.
fn chunk_sum_squares<T: Real>(c: &[T]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut blocks = c.chunks_exact(8);
    for b in &mut blocks {
        for (acc, &x) in lanes.iter_mut().zip(b) {
            let x = x.to_f64();
            *acc += x * x;
        }
    }
    let tail: f64 = blocks.remainder().iter().map(|&x| x.to_f64() * x.to_f64()).sum();
    lanes.iter().sum::<f64>() + tail
}
