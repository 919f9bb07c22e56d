//! Fused row-broadcast bias add with backward: `y = x + b` for `x` `[.., n]`, `b` `[n]`;
//! `dx = gy`, `db = sum_rows gy` (f64 within blocks of rows, blocks summed after).
//!
//! candle's `broadcast_add` backward reduces `gy` over the broadcast rows with a strided
//! `sum_keepdim`; this reduces contiguous rows instead, on the rayon pool.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::fastmath::Real;
use super::rows::{by_dtype, rows_width, slice};

/// `x + bias` with `bias` `[n]` broadcast over the rows of `x` `[.., n]`.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = x.dim(D::Minus1)?;
    if bias.dims() != [n] {
        bail!("bias add: bias {:?} must be [{n}]", bias.dims())
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

struct BiasAdd;
pub(crate) struct SumRows;

fn fwd_typed<T: Real>(s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = slice::<T>(s1, l1, "x")?;
    let b = slice::<T>(s2, l2, "bias")?;
    let (_, n) = rows_width(l1.shape())?;
    // Built by `extend` (one pass writing each element once) rather than zeroed and then
    // overwritten: the zeroing `memset` cost as much as the add itself.
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        out.extend(row.iter().zip(b).map(|(&x, &b)| x + b));
    }
    Ok((T::storage(out), l1.shape().clone()))
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-bias-add",
            &[s1],
            || fwd_typed::<f32>(s1, l1, s2, l2),
            || fwd_typed::<f64>(s1, l1, s2, l2),
        )
    }

    fn bwd(&self, _x: &Tensor, _b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = g.contiguous()?.apply_op1_no_bwd(&SumRows)?;
        Ok((Some(g.clone()), Some(db)))
    }
}

const BLOCK_ROWS: usize = 128;

fn sum_rows<T: Real>(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = slice::<T>(s, l, "grad")?;
    let (_, n) = rows_width(l.shape())?;
    let total = column_sums(g, n);
    Ok((T::storage(total.into_iter().map(T::from_f64).collect()), Shape::from(n)))
}

/// `acc += row`, widened to f64.
#[inline(always)]
fn add_row<T: Real>(acc: &mut [f64], row: &[T]) {
    for (a, &v) in acc.iter_mut().zip(row) {
        *a += v.to_f64();
    }
}

avx512_dispatch!(add_row_any, add_row_avx512, add_row, (acc: &mut [f64], row: &[T]));

/// The sums over rows of the `n`-wide rows of `g` (f64 within blocks of rows, on the rayon
/// pool, blocks summed after): a bias gradient.
pub(crate) fn column_sums<T: Real>(g: &[T], n: usize) -> Vec<f64> {
    g.par_chunks(BLOCK_ROWS * n)
        .map(|block| {
            let mut acc = vec![0f64; n];
            for row in block.chunks(n) {
                add_row_any(&mut acc, row);
            }
            acc
        })
        .reduce(
            || vec![0f64; n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "fused-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused-sum-rows",
            &[s],
            || sum_rows::<f32>(s, l),
            || sum_rows::<f64>(s, l),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_broadcast_add_values_and_gradients() {
        let dev = Device::Cpu;
        let x0 = Tensor::arange(0f64, 3.0 * 700.0 * 5.0, &dev)
            .and_then(|t| t.reshape((3, 700, 5)))
            .and_then(|t| t.sin())
            .expect("x");
        let b0 = Tensor::new(&[0.5f64, -1.0, 2.0, 0.0, 3.0], &dev).expect("b");
        let c0 = x0.cos().expect("c");
        for dtype in [DType::F64, DType::F32] {
            let run = |fused: bool| -> Vec<Vec<f64>> {
                let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("x");
                let b = Var::from_tensor(&b0.to_dtype(dtype).expect("d")).expect("b");
                let y = if fused {
                    add_bias(x.as_tensor(), b.as_tensor()).expect("fused")
                } else {
                    x.as_tensor().broadcast_add(b.as_tensor()).expect("composite")
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
                vec![
                    f(&y),
                    f(g.get(x.as_tensor()).expect("dx")),
                    f(g.get(b.as_tensor()).expect("db")),
                ]
            };
            let (a, c) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (k, (p, q)) in a.iter().zip(&c).enumerate() {
                let scale = q.iter().fold(1f64, |m, v| m.max(v.abs()));
                for (i, (u, v)) in p.iter().zip(q).enumerate() {
                    assert!((u - v).abs() <= tol * scale, "{dtype:?} out {k}[{i}]: {u} vs {v}");
                }
            }
        }
    }
}
