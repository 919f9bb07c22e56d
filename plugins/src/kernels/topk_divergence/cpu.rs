//! The CPU top-k KL: rows on the rayon pool, sums in f64; the bucket tail sweeps the full row,
//! renormalize touches only the `k` entries.

use candle_core::{bail, CpuStorage, Layout, Result, Shape};

use super::{TopkBwd, TopkFwd, TopkTail, COLS, EPS};
use crate::kernels::cpu::fastmath::{row_max, sum_exp, Real};
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice, slice_u32, with_last};

/// The forward on `(student logits, u32 ids, teacher log-probs)`.
pub(super) fn fwd(op: &TopkFwd, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-topk-kl",
        &[st[0].0],
        || fwd_typed::<f32>(op, st),
        || fwd_typed::<f64>(op, st),
    )
}

/// The backward on `(student logits, u32 ids, log-probs packed with (D, lse, c1, c2, g))`.
pub(super) fn bwd(op: &TopkBwd, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "fused-topk-kl-grad",
        &[st[0].0],
        || bwd_typed::<f32>(op, st),
        || bwd_typed::<f64>(op, st),
    )
}

#[inline]
fn valid<T: Real>(x: T) -> bool {
    x > T::NEG_INF
}

fn fwd_row<T: Real>(tail: TopkTail, it: f64, z: &[T], ids: &[u32], lpt: &[T], out: &mut [T]) {
    let (d, c0, c1, c2) = match tail {
        TopkTail::Bucket => {
            let m = row_max(z) * T::from_f64(it);
            let lse = m.to_f64() + sum_exp(z, T::from_f64(it), m).ln();
            let (mut head, mut pt_sum, mut ps_sum) = (0f64, 0f64, 0f64);
            for (&id, &lp) in ids.iter().zip(lpt) {
                if !valid(lp) {
                    continue;
                }
                let lp = lp.to_f64();
                let pt = lp.exp();
                let ls = z[id as usize].to_f64() * it - lse;
                head += if pt > 0.0 { pt * (lp - ls) } else { 0.0 };
                pt_sum += pt;
                ps_sum += ls.exp();
            }
            let mt = (1.0 - pt_sum).max(EPS);
            let ms_raw = 1.0 - ps_sum;
            let ms = ms_raw.max(EPS);
            let c = if ms_raw >= EPS { -mt / ms } else { 0.0 };
            (head + mt * (mt.ln() - ms.ln()), lse, pt_sum + c * ps_sum, c)
        }
        TopkTail::Renormalize => {
            let lse = |f: &dyn Fn(usize) -> f64| -> f64 {
                let m = (0..ids.len())
                    .filter(|&j| valid(lpt[j]))
                    .map(f)
                    .fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = (0..ids.len())
                    .filter(|&j| valid(lpt[j]))
                    .map(|j| (f(j) - m).exp())
                    .sum();
                m + s.ln()
            };
            let a = |j: usize| z[ids[j] as usize].to_f64() * it;
            let b = |j: usize| lpt[j].to_f64() * it;
            let (lse_s, lse_t) = (lse(&a), lse(&b));
            let mut d = 0.0;
            for j in (0..ids.len()).filter(|&j| valid(lpt[j])) {
                let lt = b(j) - lse_t;
                let qt = lt.exp();
                if qt > 0.0 {
                    d += qt * (lt - (a(j) - lse_s));
                }
            }
            (
                if ids.iter().zip(lpt).any(|(_, &l)| valid(l)) {
                    d
                } else {
                    0.0
                },
                lse_s,
                lse_t,
                0.0,
            )
        }
    };
    out[0] = T::from_f64(d);
    out[1] = T::from_f64(c0);
    out[2] = T::from_f64(c1);
    out[3] = T::from_f64(c2);
}

fn bwd_row<T: Real>(tail: TopkTail, it: f64, z: &[T], ids: &[u32], lpt: &[T], aux: &[T], out: &mut [T]) {
    let g = aux[COLS].to_f64() * it;
    match tail {
        TopkTail::Bucket => {
            let (lse, k1, c) = (aux[1], aux[2].to_f64(), aux[3].to_f64());
            let (t, gk) = (T::from_f64(it), T::from_f64(g * k1));
            for (o, &x) in out.iter_mut().zip(z) {
                *o = gk * (x * t - lse).exp();
            }
            let lse = lse.to_f64();
            for (&id, &lp) in ids.iter().zip(lpt) {
                if valid(lp) {
                    let ps = (z[id as usize].to_f64() * it - lse).exp();
                    let o = &mut out[id as usize];
                    *o = *o - T::from_f64(g * (lp.to_f64().exp() + c * ps));
                }
            }
        }
        TopkTail::Renormalize => {
            let (lse_s, lse_t) = (aux[1].to_f64(), aux[2].to_f64());
            for (&id, &lp) in ids.iter().zip(lpt) {
                if valid(lp) {
                    let qs = (z[id as usize].to_f64() * it - lse_s).exp();
                    let qt = (lp.to_f64() * it - lse_t).exp();
                    let o = &mut out[id as usize];
                    *o = *o + T::from_f64(g * (qs - qt));
                }
            }
        }
    }
}

type Arg<'a> = (&'a CpuStorage, &'a Layout);

fn check_ids(ids: &[u32], v: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
        bail!("top-k KL: teacher id {bad} is outside the student's vocabulary of {v}")
    }
    Ok(())
}

fn fwd_typed<T: Real>(op: &TopkFwd, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(st[0].0, st[0].1, "student logits")?;
    let ids = slice_u32(st[1].0, st[1].1, "teacher ids")?;
    let lpt = slice::<T>(st[2].0, st[2].1, "teacher log-probs")?;
    let (rows, v) = rows_width(st[0].1.shape())?;
    let (_, k) = rows_width(st[1].1.shape())?;
    check_ids(ids, v)?;
    let mut out = vec![T::ZERO; rows * COLS];
    let cost = if op.tail == TopkTail::Bucket { v } else { k };
    for_rows(&mut out, COLS, cost, |r, o| {
        fwd_row(
            op.tail,
            op.inv_t,
            &z[r * v..(r + 1) * v],
            &ids[r * k..(r + 1) * k],
            &lpt[r * k..(r + 1) * k],
            o,
        )
    });
    Ok((T::storage(out), with_last(st[0].1.shape(), COLS)))
}

fn bwd_typed<T: Real>(op: &TopkBwd, st: [Arg; 3]) -> Result<(CpuStorage, Shape)> {
    let z = slice::<T>(st[0].0, st[0].1, "student logits")?;
    let ids = slice_u32(st[1].0, st[1].1, "teacher ids")?;
    let packed = slice::<T>(st[2].0, st[2].1, "saved row statistics")?;
    let (_, v) = rows_width(st[0].1.shape())?;
    let (_, k) = rows_width(st[1].1.shape())?;
    let w = k + COLS + 1;
    let mut out = vec![T::ZERO; z.len()];
    let cost = if op.tail == TopkTail::Bucket { v } else { k };
    for_rows(&mut out, v, cost, |r, o| {
        let p = &packed[r * w..(r + 1) * w];
        bwd_row(
            op.tail,
            op.inv_t,
            &z[r * v..(r + 1) * v],
            &ids[r * k..(r + 1) * k],
            &p[..k],
            &p[k..],
            o,
        )
    });
    Ok((T::storage(out), st[0].1.shape().clone()))
}
