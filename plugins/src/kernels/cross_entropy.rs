//! Fused per-token cross-entropy with label smoothing, with its gradient w.r.t. the logits.
//!
//! Per row with logits `z` `[V]`, label `y`, `lse = ln sum_v e^{z_v}`:
//! `L = (1 - eps) (lse - z_y) + eps (lse - mean_v z_v)`,
//! `dL/dz_u = softmax(z)_u - (1 - eps) [u = y] - eps / V`.
//!
//! Forward: one pass for the max, one for `sum e^{z - max}` and `sum z`; output `[.., 2]` =
//! `(L, lse)`. Backward: one sweep writing `g * dL/dz`. Sums in f64, rows in parallel.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::fastmath::{row_max, sum, sum_exp, Real};
use super::rows::{by_dtype, for_rows, output_vec, rows_width, slice, slice_u32, with_last};

const COLS: usize = 2;

/// Per-token cross-entropy `[..]` of `logits` `[.., V]` against `targets` `[..]` (integer ids),
/// smoothed by `eps`, differentiable w.r.t. the logits.
pub fn per_token(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let z = logits.contiguous()?;
    let y = targets.to_dtype(DType::U32)?.contiguous()?;
    if z.dims()[..z.rank().saturating_sub(1)] != *y.dims() {
        bail!(
            "cross-entropy: logits {:?} and targets {:?} disagree",
            z.dims(),
            y.dims()
        )
    }
    let out = z.apply_op2(&y, CeFwd { eps })?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

struct CeFwd {
    eps: f64,
}

struct CeBwd {
    eps: f64,
}

fn fwd_typed<T: Real>(
    eps: f64,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(s1, l1, "logits")?;
    let y = slice_u32(s2, l2, "targets")?;
    let (rows, v) = rows_width(l1.shape())?;
    if let Some(bad) = y.iter().find(|&&t| t as usize >= v) {
        bail!("cross-entropy: target {bad} is outside the vocabulary of {v}")
    }
    let mut out = vec![T::ZERO; rows * COLS];
    for_rows(&mut out, COLS, v, |r, o| {
        let row = &z[r * v..(r + 1) * v];
        let m = row_max(row);
        let lse = m.to_f64() + sum_exp(row, T::ONE, m).ln();
        let nll = lse - row[y[r] as usize].to_f64();
        let loss = if eps > 0.0 {
            (1.0 - eps) * nll + eps * (lse - sum(row) / v as f64)
        } else {
            nll
        };
        o[0] = T::from_f64(loss);
        o[1] = T::from_f64(lse);
    });
    Ok((T::storage(out), with_last(l1.shape(), COLS)))
}

impl CustomOp2 for CeFwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-cross-entropy",
            &[s1],
            || fwd_typed::<f32>(self.eps, s1, l1, s2, l2),
            || fwd_typed::<f64>(self.eps, s1, l1, s2, l2),
        )
    }

    fn bwd(&self, z: &Tensor, y: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.narrow(D::Minus1, 0, 1)?;
        let aux = Tensor::cat(&[&res.detach(), &g], D::Minus1)?.contiguous()?;
        let gz = z.detach().apply_op3_no_bwd(y, &aux, &CeBwd { eps: self.eps })?;
        Ok((Some(gz), None))
    }
}

type Arg<'a> = (&'a CpuStorage, &'a Layout);

fn bwd_typed<T: Real>(eps: f64, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(st[0].0, st[0].1, "logits")?;
    let y = slice_u32(st[1].0, st[1].1, "targets")?;
    let aux = slice::<T>(st[2].0, st[2].1, "saved row statistics")?;
    let (_, v) = rows_width(st[0].1.shape())?;
    let w = COLS + 1;
    let mut out = output_vec(z.len());
    for_rows(&mut out, v, v, |r, o| {
        let (lse, g) = (aux[r * w + 1], aux[r * w + COLS]);
        let shift = T::from_f64(eps / v as f64);
        for (o, &x) in o.iter_mut().zip(&z[r * v..(r + 1) * v]) {
            *o = g * ((x - lse).exp() - shift);
        }
        let t = y[r] as usize;
        o[t] = o[t] - g * T::from_f64(1.0 - eps);
    });
    Ok((T::storage(out), st[0].1.shape().clone()))
}

impl CustomOp3 for CeBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
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
            "fused-cross-entropy-grad",
            &[s1],
            || bwd_typed::<f32>(self.eps, st),
            || bwd_typed::<f64>(self.eps, st),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::ce::composite_cross_entropy;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec")
    }

    #[test]
    fn matches_composite_values_and_gradients_with_mask_and_smoothing() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (v, eps) in [(65, 0.0), (1000, 0.1), (3, 0.3)] {
            let x: Vec<f64> = (0..8 * v).map(|_| rng.random_range(-5.0..5.0)).collect();
            let y: Vec<u32> = (0..8).map(|_| rng.random_range(0..v as u32)).collect();
            let z = Tensor::from_vec(x, (2, 4, v), &Device::Cpu).expect("z");
            let y = Tensor::from_vec(y, (2, 4), &Device::Cpu).expect("y");
            let mask = Tensor::new(&[[1.0f64, 1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 0.0]], &Device::Cpu).expect("m");
            for dtype in [DType::F64, DType::F32] {
                let run = |fused: bool| {
                    let var = Var::from_tensor(&z.to_dtype(dtype).expect("d")).expect("v");
                    let m = mask.to_dtype(dtype).expect("m");
                    let loss = if fused {
                        let per = per_token(var.as_tensor(), &y, eps).expect("fused");
                        crate::losses::masked_mean(&per, Some(&m)).expect("mean")
                    } else {
                        composite_cross_entropy(&var.as_tensor().to_dtype(DType::F64).expect("d"), &y, Some(&mask), eps)
                            .expect("composite")
                    };
                    let g = loss.backward().expect("bwd");
                    (flat(&loss)[0], flat(g.get(var.as_tensor()).expect("grad")))
                };
                let ((fv, fg), (cv, cg)) = (run(true), run(false));
                let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
                assert!((fv - cv).abs() <= tol * cv.abs(), "V={v} {dtype:?}: {fv} vs {cv}");
                let scale = cg.iter().fold(0f64, |m, x| m.max(x.abs()));
                for (i, (a, b)) in fg.iter().zip(&cg).enumerate() {
                    assert!((a - b).abs() <= tol * scale, "V={v} {dtype:?} grad[{i}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn out_of_range_target_is_an_error() {
        let z = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).expect("z");
        let y = Tensor::new(&[[0u32, 3]], &Device::Cpu).expect("y");
        let err = per_token(&z, &y, 0.0).expect_err("must fail");
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }
}
