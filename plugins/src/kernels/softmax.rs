//! Fused softmax over the last dim, optionally causal, with backward.
//!
//! `y_j = e^{x_j - m} / sum_k e^{x_k - m}` over the row; with `causal`, the rows are the query
//! positions of `[.., T, T]` scores and row `i` keeps columns `j <= i` only (the others get
//! probability 0 and no gradient), so no additive `-inf` mask tensor is needed.
//! Backward from the saved output: `dx_j = y_j (gy_j - sum_k gy_k y_k)`.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::fastmath::{row_max, Real};
use super::rows::{by_dtype, for_rows, rows_width, slice};

/// Softmax over the last dim of `x`; with `causal`, `x` is `[.., T, T]` and row `i` of every
/// `T x T` matrix attends to columns `0..=i`. f32/f64 on the CPU (see [`super::fusable`]).
pub fn softmax(x: &Tensor, causal: bool) -> Result<Tensor> {
    if causal {
        let d = x.dims();
        if d.len() < 2 || d[d.len() - 1] != d[d.len() - 2] {
            bail!("causal softmax: expected [.., T, T] scores, got {d:?}")
        }
    }
    x.contiguous()?.apply_op1(SoftmaxOp { causal })
}

struct SoftmaxOp {
    causal: bool,
}

struct SoftmaxBwd;

/// Columns that count in row `r` of a `width`-wide matrix.
#[inline]
fn live(causal: bool, r: usize, width: usize) -> usize {
    if causal {
        r % width + 1
    } else {
        width
    }
}

fn fwd_typed<T: Real>(causal: bool, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s, l, "scores")?;
    let (_, v) = rows_width(l.shape())?;
    let mut out = vec![T::ZERO; x.len()];
    for_rows(&mut out, v, v, |r, o| {
        let n = live(causal, r, v);
        let row = &x[r * v..r * v + n];
        let m = row_max(row);
        let mut total = 0f64;
        for (o, &x) in o[..n].iter_mut().zip(row) {
            let e = (x - m).exp();
            *o = e;
            total += e.to_f64();
        }
        let inv = T::from_f64(1.0 / total);
        for o in o[..n].iter_mut() {
            *o = *o * inv;
        }
    });
    Ok((T::storage(out), l.shape().clone()))
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-softmax",
            &[s],
            || fwd_typed::<f32>(self.causal, s, l),
            || fwd_typed::<f64>(self.causal, s, l),
        )
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.detach().apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

fn bwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let y = slice::<T>(s1, l1, "softmax output")?;
    let g = slice::<T>(s2, l2, "grad")?;
    let (_, v) = rows_width(l1.shape())?;
    let mut out = vec![T::ZERO; y.len()];
    for_rows(&mut out, v, v, |r, o| {
        let (yr, gr) = (&y[r * v..(r + 1) * v], &g[r * v..(r + 1) * v]);
        let dot: f64 = yr.iter().zip(gr).map(|(&y, &g)| (y * g).to_f64()).sum();
        let dot = T::from_f64(dot);
        for ((o, &y), &g) in o.iter_mut().zip(yr).zip(gr) {
            *o = y * (g - dot);
        }
    });
    Ok((T::storage(out), l1.shape().clone()))
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-softmax-grad",
            &[s1],
            || bwd_typed::<f32>(s1, l1, s2, l2),
            || bwd_typed::<f64>(s1, l1, s2, l2),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::{causal_mask, softmax_last_composite};
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_composite_values_and_gradients_plain_and_causal() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let t = 13;
        let xs: Vec<f64> = (0..2 * 3 * t * t).map(|_| rng.random_range(-6.0..6.0)).collect();
        let cs: Vec<f64> = (0..2 * 3 * t * t).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x0 = Tensor::from_vec(xs, (2, 3, t, t), &Device::Cpu).expect("x");
        let c0 = Tensor::from_vec(cs, (2, 3, t, t), &Device::Cpu).expect("c");
        for dtype in [DType::F64, DType::F32] {
            for causal in [false, true] {
                let run = |fused: bool| -> (Vec<f64>, Vec<f64>) {
                    let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("v");
                    let y = if fused {
                        softmax(x.as_tensor(), causal).expect("fused")
                    } else if causal {
                        let m = causal_mask(t, dtype, &Device::Cpu).expect("mask");
                        softmax_last_composite(&x.as_tensor().broadcast_add(&m).expect("add")).expect("c")
                    } else {
                        softmax_last_composite(x.as_tensor()).expect("c")
                    };
                    let g = (&y * c0.to_dtype(dtype).expect("d"))
                        .and_then(|l| l.sum_all())
                        .and_then(|l| l.backward())
                        .expect("bwd");
                    let f = |t: &Tensor| -> Vec<f64> {
                        t.to_dtype(DType::F64)
                            .and_then(|t| t.flatten_all())
                            .and_then(|t| t.to_vec1())
                            .expect("v")
                    };
                    (f(&y), f(g.get(x.as_tensor()).expect("grad")))
                };
                let ((fy, fg), (cy, cg)) = (run(true), run(false));
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for i in 0..fy.len() {
                    assert!(
                        (fy[i] - cy[i]).abs() <= tol,
                        "{dtype:?} causal={causal} y[{i}]: {} vs {}",
                        fy[i],
                        cy[i]
                    );
                    assert!(
                        (fg[i] - cg[i]).abs() <= tol,
                        "{dtype:?} causal={causal} dx[{i}]: {} vs {}",
                        fg[i],
                        cg[i]
                    );
                }
            }
        }
    }
}
