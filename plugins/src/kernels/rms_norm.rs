//! Fused RMSNorm over the last dim (Zhang & Sennrich, 2019) with backward for the input and
//! the weight.
//!
//! Per row of width `D`: `r = 1 / sqrt(mean x^2 + eps)`, `xh = x r`, `y = xh w`. Backward with
//! `gy` the incoming gradient and `gh = gy w`: `dx = r (gh - xh mean(gh xh))`,
//! `dw = sum_rows gy xh`. Row statistics in f64; the backward recomputes `r` from `x` and
//! reduces `dw` per block of rows before summing the blocks. Replaces the six-node composite
//! (`sqr`, `mean`, `+ eps`, `sqrt`, `div`, `mul`), each of whose gradients candle would
//! zero-fill and add into.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::fastmath::Real;
use super::rows::{by_dtype, for_rows, output_vec, rows_width, slice};

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dim of `x`; `weight` is `[D]`. f32/f64
/// on the CPU (see [`super::fusable`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        bail!("rms norm: weight {:?} must be [{d}]", weight.dims())
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNormOp { eps })
}

struct RmsNormOp {
    eps: f64,
}

struct RmsNormBwd {
    eps: f64,
    /// The forward's weight (the backward op's arguments are `x` and `gy`).
    weight: Tensor,
}

/// `1 / sqrt(mean x^2 + eps)` of a row, in f64.
#[inline]
fn inv_rms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ms = x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / x.len() as f64;
    1.0 / (ms + eps).sqrt()
}

fn fwd_typed<T: Real>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "x")?;
    let w = slice::<T>(s2, l2, "weight")?;
    let (_, d) = rows_width(l1.shape())?;
    let mut out = output_vec(x.len());
    for_rows(&mut out, d, d, |r, o| {
        let row = &x[r * d..(r + 1) * d];
        let rs = T::from_f64(inv_rms(row, eps));
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v * rs * w;
        }
    });
    Ok((T::storage(out), l1.shape().clone()))
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-rms-norm",
            &[s1, s2],
            || fwd_typed::<f32>(self.eps, s1, l1, s2, l2),
            || fwd_typed::<f64>(self.eps, s1, l1, s2, l2),
        )
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d;
        // Output rows 0..rows: dx; row `rows`: dw.
        let op = RmsNormBwd {
            eps: self.eps,
            weight: w.detach(),
        };
        let packed = x.detach().apply_op2_no_bwd(&g.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// Rows per block of the backward (each block reduces its own `dw`).
const BLOCK_ROWS: usize = 64;

fn bwd_typed<T: Real>(op: &RmsNormBwd, x: &[T], g: &[T], d: usize) -> Result<(CpuStorage, Shape)> {
    let (ws, wl) = op.weight.storage_and_layout();
    let candle_core::Storage::Cpu(ws) = &*ws else {
        bail!("fused-rms-norm-grad: expected a CPU weight")
    };
    let w = slice::<T>(ws, wl, "weight")?;
    let rows = x.len() / d;
    let mut out = output_vec((rows + 1) * d);
    let (dx, dw_out) = out.split_at_mut(rows * d);
    let dw = dx
        .par_chunks_mut(BLOCK_ROWS * d)
        .enumerate()
        .map(|(bi, block)| {
            let mut acc = vec![0f64; d];
            for (i, o) in block.chunks_mut(d).enumerate() {
                let r = bi * BLOCK_ROWS + i;
                let (xr, gr) = (&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                let rs = inv_rms(xr, op.eps);
                let mut m = 0f64;
                for j in 0..d {
                    let xh = xr[j].to_f64() * rs;
                    m += gr[j].to_f64() * w[j].to_f64() * xh;
                    acc[j] += gr[j].to_f64() * xh;
                }
                let m = m / d as f64;
                for j in 0..d {
                    let xh = xr[j].to_f64() * rs;
                    o[j] = T::from_f64(rs * (gr[j].to_f64() * w[j].to_f64() - xh * m));
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        );
    for (o, v) in dw_out.iter_mut().zip(dw) {
        *o = T::from_f64(v);
    }
    Ok((T::storage(out), Shape::from((rows + 1, d))))
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d) = rows_width(l1.shape())?;
        by_dtype(
            "fused-rms-norm-grad",
            &[s1, s2],
            || bwd_typed::<f32>(self, slice(s1, l1, "x")?, slice(s2, l2, "grad")?, d),
            || bwd_typed::<f64>(self, slice(s1, l1, "x")?, slice(s2, l2, "grad")?, d),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::values;
    use crate::models::nn::rms_norm_composite;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    /// Values, `dx` and `dw` against the composite, f64 (1e-10) and f32 (1e-5), on rows whose
    /// scales differ by orders of magnitude.
    #[test]
    fn matches_composite_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (rows, d) = (130, 40);
        let xs: Vec<f64> = (0..rows * d)
            .map(|i| rng.random_range(-2.0..3.0) * 10f64.powi((i / d % 5) as i32 - 2))
            .collect();
        let x0 = Tensor::from_vec(xs, (2, 65, d), &Device::Cpu).expect("x");
        let w0 = Tensor::from_vec(
            (0..d).map(|_| rng.random_range(0.5..1.5)).collect::<Vec<f64>>(),
            d,
            &Device::Cpu,
        )
        .expect("w");
        let c0 = Tensor::from_vec(
            (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f64>>(),
            (2, 65, d),
            &Device::Cpu,
        )
        .expect("c");
        for dtype in [DType::F64, DType::F32] {
            let run = |fused: bool| -> Vec<Vec<f64>> {
                let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("x");
                let w = Var::from_tensor(&w0.to_dtype(dtype).expect("d")).expect("w");
                let y = if fused {
                    rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).expect("fused")
                } else {
                    rms_norm_composite(x.as_tensor(), w.as_tensor(), 1e-6).expect("composite")
                };
                let g = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                vec![
                    values(&y),
                    values(g.get(x.as_tensor()).expect("dx")),
                    values(g.get(w.as_tensor()).expect("dw")),
                ]
            };
            let (a, c) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (k, (p, q)) in a.iter().zip(&c).enumerate() {
                // Relative to the largest magnitude of the same row (`y`, `dx`: rows differ in
                // scale by 1e4) or of the whole tensor (`dw`).
                let width = if k < 2 { d } else { q.len() };
                for (r, (pr, qr)) in p.chunks(width).zip(q.chunks(width)).enumerate() {
                    let scale = qr.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
                    for (i, (u, v)) in pr.iter().zip(qr).enumerate() {
                        assert!(
                            (u - v).abs() <= tol * scale,
                            "{dtype:?} out {k} row {r} [{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn weight_shape_is_checked() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).expect("x");
        let w = Tensor::zeros(3, DType::F32, &Device::Cpu).expect("w");
        assert!(rms_norm(&x, &w, 1e-6).unwrap_err().to_string().contains("must be [4]"));
    }
}
