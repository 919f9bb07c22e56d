//! Fused SwiGLU gate (Shazeer, 2020): `y = silu(g) u` with `silu(g) = g s`, `s = sigmoid(g)`,
//! the activation of llama's MLP, with backward
//! `dg = dy u s (1 + g (1 - s))`, `du = dy g s`.
//!
//! One pass with the vectorised `exp` of [`super::fastmath`] instead of candle's `silu` and
//! `mul` (two nodes, each with its own zero-filled gradient in candle's backward); chunks
//! spread over the rayon pool; the backward recomputes `s` from `g`.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::Real;
use super::rows::{by_dtype, output_vec, slice};

const CHUNK: usize = 16_384;

/// `silu(g) * u` for `g`, `u` of one shape, f32/f64 on the CPU (see [`super::fusable`]).
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if g.dims() != u.dims() {
        bail!("swiglu: gate {:?} and up {:?} differ in shape", g.dims(), u.dims())
    }
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;
struct SwiGluBwd;

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

avx512_dispatch!(fwd_chunk_any, fwd_chunk_avx512, fwd_chunk, (o: &mut [T], g: &[T], u: &[T]));
avx512_dispatch!(bwd_chunk_any, bwd_chunk_avx512, bwd_chunk, (o: &mut [T], o2: &mut [T], g: &[T], u: &[T], dy: &[T]));

fn fwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let (g, u) = (slice::<T>(s1, l1, "gate")?, slice::<T>(s2, l2, "up")?);
    let mut out = output_vec(g.len());
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| fwd_chunk_any(o, g, u));
    Ok((T::storage(out), l1.shape().clone()))
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-swiglu",
            &[s1, s2],
            || fwd_typed::<f32>(s1, l1, s2, l2),
            || fwd_typed::<f64>(s1, l1, s2, l2),
        )
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        // `dg` then `du`, one after the other.
        let packed = g
            .detach()
            .apply_op3_no_bwd(&u.detach(), &dy.contiguous()?, &SwiGluBwd)?;
        let dg = packed.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
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

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let st = [(s1, l1), (s2, l2), (s3, l3)];
        by_dtype(
            "fused-swiglu-grad",
            &[s1],
            || bwd_typed::<f32>(st),
            || bwd_typed::<f64>(st),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::values;
    use candle_core::{DType, Device, Var};

    /// Values and both gradients against candle's `silu` times `u`, f64 (1e-10) and f32 (1e-5
    /// relative to the largest magnitude), over gates from -30 to 30 (both saturations).
    #[test]
    fn matches_candle_silu_times_up() {
        let dev = Device::Cpu;
        let n = 40_001;
        let g0 = Tensor::arange(0f64, n as f64, &dev)
            .and_then(|t| (t / 666.0)? - 30.0)
            .expect("g");
        let u0 = Tensor::arange(0f64, n as f64, &dev)
            .and_then(|t| (t * 0.01)?.sin())
            .expect("u");
        let c0 = Tensor::arange(0f64, n as f64, &dev)
            .and_then(|t| (t * 0.003)?.cos())
            .expect("c");
        for dtype in [DType::F64, DType::F32] {
            let run = |fused: bool| -> Vec<Vec<f64>> {
                let g = Var::from_tensor(&g0.to_dtype(dtype).expect("d")).expect("g");
                let u = Var::from_tensor(&u0.to_dtype(dtype).expect("d")).expect("u");
                let y = if fused {
                    swiglu(g.as_tensor(), u.as_tensor()).expect("fused")
                } else {
                    (g.as_tensor().silu().expect("silu") * u.as_tensor()).expect("mul")
                };
                let grads = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                vec![
                    values(&y),
                    values(grads.get(g.as_tensor()).expect("dg")),
                    values(grads.get(u.as_tensor()).expect("du")),
                ]
            };
            let (a, c) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (k, (p, q)) in a.iter().zip(&c).enumerate() {
                let scale = q.iter().fold(1f64, |m, v| m.max(v.abs()));
                for (i, (x, y)) in p.iter().zip(q).enumerate() {
                    assert!((x - y).abs() <= tol * scale, "{dtype:?} out {k}[{i}]: {x} vs {y}");
                }
            }
        }
        let e = swiglu(&g0, &g0.narrow(0, 0, 10).expect("n")).expect_err("shapes");
        assert!(e.to_string().contains("differ in shape"), "{e}");
    }
}
