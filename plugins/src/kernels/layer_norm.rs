//! Fused LayerNorm over the last dim (Ba, Kiros & Hinton, 2016) with backward for the input,
//! the weight and the bias.
//!
//! Per row of width `D`: `mu = mean x`, `r = 1 / sqrt(mean (x - mu)^2 + eps)`,
//! `xh = (x - mu) r`, `y = xh w + b`. Backward with `gy` the incoming gradient and
//! `gx_h = gy w`: `dx = r (gx_h - mean gx_h - xh mean(gx_h xh))`, `dw = sum_rows gy xh`,
//! `db = sum_rows gy`. Row sums lane-wise in the element type, f64 across blocks (as the other
//! kernels, see [`super::fastmath::reduce2`]); the backward recomputes the row statistics from
//! `x` (rows are short) and reduces `dw`, `db` in f64 per block of rows before summing the
//! blocks. The row loops are compiled for AVX-512 where the CPU has it.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::fastmath::{reduce2, sum, Real, LANES};
use super::rows::{by_dtype, for_rows, output_vec, rows_width, slice};

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dim of `x`; `weight`, `bias`
/// are `[D]`. f32/f64 on the CPU (see [`super::fusable`]).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "layer norm: weight {:?} and bias {:?} must be [{d}]",
            weight.dims(),
            bias.dims()
        )
    }
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps })
}

struct LayerNormOp {
    eps: f64,
}

struct LayerNormBwd {
    eps: f64,
}

/// `(mean, 1 / sqrt(var + eps))` of a row: two lane-wise passes (mean, then the centred
/// squares), f64 across blocks (see [`reduce2`]).
#[inline(always)]
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mu = sum(x) / n;
    let m = T::from_f64(mu);
    let var = reduce2(x, x, |v, _| [(v - m) * (v - m)])[0] / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// One row of the forward: `o = (x - mu) r w + b`.
#[inline(always)]
fn fwd_row<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64, o: &mut [T]) {
    let (mu, rs) = stats(x, eps);
    let (mu, rs) = (T::from_f64(mu), T::from_f64(rs));
    for (((o, &v), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mu) * rs * w + b;
    }
}

/// One row of the backward: `dx` written into (or, with `accumulate`, added to) `o`, and the
/// row's `gy xh` and `gy` added to the block's f64 column sums `acc_w`, `acc_b`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_row<T: Real>(
    x: &[T],
    g: &[T],
    w: &[T],
    eps: f64,
    acc_w: &mut [f64],
    acc_b: &mut [f64],
    o: &mut [T],
    accumulate: bool,
) {
    let d = x.len();
    let (mu, rs) = stats(x, eps);
    let (mu, rs) = (T::from_f64(mu), T::from_f64(rs));
    // m1 = mean gy w, m2 = mean gy w xh, lane-wise.
    let (mut a1, mut a2) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    let (cx, cg, cw) = (x.chunks_exact(LANES), g.chunks_exact(LANES), w.chunks_exact(LANES));
    let (rx, rg, rw) = (cx.remainder(), cg.remainder(), cw.remainder());
    for ((cx, cg), cw) in cx.zip(cg).zip(cw) {
        for i in 0..LANES {
            let gh = cg[i] * cw[i];
            a1[i] = a1[i] + gh;
            a2[i] = a2[i] + gh * ((cx[i] - mu) * rs);
        }
    }
    let (mut m1, mut m2) = (0f64, 0f64);
    for ((&x, &g), &w) in rx.iter().zip(rg).zip(rw) {
        m1 += (g * w).to_f64();
        m2 += (g * w * ((x - mu) * rs)).to_f64();
    }
    m1 += a1.iter().map(|v| v.to_f64()).sum::<f64>();
    m2 += a2.iter().map(|v| v.to_f64()).sum::<f64>();
    let (m1, m2) = (T::from_f64(m1 / d as f64), T::from_f64(m2 / d as f64));
    for (((aw, ab), &x), &g) in acc_w.iter_mut().zip(acc_b.iter_mut()).zip(x).zip(g) {
        *aw += (g * ((x - mu) * rs)).to_f64();
        *ab += g.to_f64();
    }
    let dx = |x: T, g: T, w: T| rs * (g * w - m1 - (x - mu) * rs * m2);
    if accumulate {
        for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
            *o = *o + dx(x, g, w);
        }
    } else {
        for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
            *o = dx(x, g, w);
        }
    }
}

avx512_dispatch!(fwd_row_any, fwd_row_avx512, fwd_row, (x: &[T], w: &[T], b: &[T], eps: f64, o: &mut [T]));
avx512_dispatch!(bwd_row_any, bwd_row_avx512, bwd_row, (x: &[T], g: &[T], w: &[T], eps: f64, acc_w: &mut [f64], acc_b: &mut [f64], o: &mut [T], accumulate: bool));

fn fwd_typed<T: Real>(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(st[0].0, st[0].1, "x")?;
    let w = slice::<T>(st[1].0, st[1].1, "weight")?;
    let b = slice::<T>(st[2].0, st[2].1, "bias")?;
    let (_, d) = rows_width(st[0].1.shape())?;
    Ok((T::storage(forward_rows(x, w, b, d, eps)), st[0].1.shape().clone()))
}

/// The LayerNorm of the `d`-wide rows of `x` (on slices, for ops that fuse several layers).
pub(crate) fn forward_rows<T: Real>(x: &[T], w: &[T], b: &[T], d: usize, eps: f64) -> Vec<T> {
    let mut out = output_vec(x.len());
    for_rows(&mut out, d, d, |r, o| fwd_row_any(&x[r * d..(r + 1) * d], w, b, eps, o));
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
            "fused-layer-norm",
            &[s1],
            || fwd_typed::<f32>(self.eps, st),
            || fwd_typed::<f64>(self.eps, st),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        // Output rows 0..rows: dx; row `rows`: dw; row `rows + 1`: db.
        let packed = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &g.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Rows per block of the backward (each block reduces its own `dw`, `db`).
const BLOCK_ROWS: usize = 64;

fn bwd_typed<T: Real>(eps: f64, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(st[0].0, st[0].1, "x")?;
    let w = slice::<T>(st[1].0, st[1].1, "weight")?;
    let g = slice::<T>(st[2].0, st[2].1, "grad")?;
    let (rows, d) = rows_width(st[0].1.shape())?;
    let mut out = output_vec((rows + 2) * d);
    let (dx, dwb) = out.split_at_mut(rows * d);
    let partial = backward_rows(x, w, g, d, eps, dx, false);
    for (o, p) in dwb.iter_mut().zip(&partial) {
        *o = T::from_f64(*p);
    }
    Ok((T::storage(out), Shape::from((rows + 2, d))))
}

/// The LayerNorm backward on slices: writes `dx` (or adds it to what `dx` holds, with
/// `accumulate`) and returns `dw` followed by `db` (`2 d` values, f64).
pub(crate) fn backward_rows<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    d: usize,
    eps: f64,
    dx: &mut [T],
    accumulate: bool,
) -> Vec<f64> {
    dx.par_chunks_mut(BLOCK_ROWS * d)
        .enumerate()
        .map(|(bi, block)| {
            let mut acc = vec![0f64; 2 * d];
            let (acc_w, acc_b) = acc.split_at_mut(d);
            for (i, o) in block.chunks_mut(d).enumerate() {
                let r = bi * BLOCK_ROWS + i;
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                bwd_row_any(xr, gr, w, eps, acc_w, acc_b, o, accumulate);
            }
            acc
        })
        .reduce(
            || vec![0f64; 2 * d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
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
            "fused-layer-norm-grad",
            &[s1],
            || bwd_typed::<f32>(self.eps, st),
            || bwd_typed::<f64>(self.eps, st),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::layer_norm_composite;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_composite_values_and_all_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (rows, d) = (150, 48);
        let mut draw = |n: usize, lo: f64, hi: f64| -> Vec<f64> { (0..n).map(|_| rng.random_range(lo..hi)).collect() };
        let x0 = Tensor::from_vec(draw(rows * d, -3.0, 5.0), (3, 50, d), &Device::Cpu).expect("x");
        let w0 = Tensor::from_vec(draw(d, 0.5, 1.5), d, &Device::Cpu).expect("w");
        let b0 = Tensor::from_vec(draw(d, -0.5, 0.5), d, &Device::Cpu).expect("b");
        let c0 = Tensor::from_vec(draw(rows * d, -1.0, 1.0), (3, 50, d), &Device::Cpu).expect("c");
        for dtype in [DType::F64, DType::F32] {
            let run = |fused: bool| -> Vec<Vec<f64>> {
                let v = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).expect("d")).expect("v");
                let (x, w, b) = (v(&x0), v(&w0), v(&b0));
                let y = if fused {
                    layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).expect("fused")
                } else {
                    layer_norm_composite(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).expect("composite")
                };
                let grads = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                let f = |t: &Tensor| -> Vec<f64> {
                    t.to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1())
                        .expect("v")
                };
                vec![
                    f(&y),
                    f(grads.get(x.as_tensor()).expect("dx")),
                    f(grads.get(w.as_tensor()).expect("dw")),
                    f(grads.get(b.as_tensor()).expect("db")),
                ]
            };
            let (fu, co) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (name, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(fu.iter().zip(&co)) {
                let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!((p - q).abs() <= tol * scale, "{dtype:?} {name}[{i}]: {p} vs {q}");
                }
            }
        }
    }
}
