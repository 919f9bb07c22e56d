//! Fused per-token top-k KL (the `topk_kl` term) with its gradient w.r.t. the student logits.
//!
//! Inputs per row: student logits `z` `[V]`, teacher ids `S = (id_j)` and teacher log-probs
//! `lpt_j` (at temperature 1), `j < k`. An entry with `lpt_j = -inf` is skipped (that is how
//! the union with the student's top-k marks duplicates). `a = z / T`, `ls = log_softmax(a)`,
//! `p_s = e^ls`.
//!
//! - bucket (`T = 1`): `D = sum_j pt_j (lpt_j - ls_{id_j}) + m_t ln(m_t / m_s)`,
//!   `m_t = max(1 - P_t, eps)`, `m_s = max(1 - P_s, eps)`, `P_t = sum_j pt_j`,
//!   `P_s = sum_j p_s,id_j`. With `c = -m_t / m_s` (0 when `m_s` is clamped):
//!   `dD/da_u = p_s,u (P_t + c P_s) - sum_{j: id_j = u} (pt_j + c p_s,u)`.
//!   One full-row pass for the student's log-normaliser; the rest touches `k` entries.
//! - renormalize: `q_t = softmax_S(lpt / T)`, `q_s = softmax_S(a_S)`,
//!   `D = sum_j q_t,j (ln q_t,j - ln q_s,j)`, `dD/da_{id_j} += q_s,j - q_t,j`. Touches only
//!   the `k` entries (the student's full log-normaliser cancels).
//!
//! `dD/dz = dD/da / T`. Forward output `[.., 4]` = `(D, lse, c1, c2)`; the backward writes the
//! dense gradient row in one sweep (bucket) or zeros plus `k` entries (renormalize).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fastmath::{row_max, sum_exp, Real};
use super::rows::{by_dtype, for_rows, rows_width, slice, slice_u32, with_last};

/// Tail treatment (see [`crate::losses::topk_kl::Tail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkTail {
    /// The mass outside the top-k is one more outcome.
    Bucket,
    /// Both sides renormalised over the top-k.
    Renormalize,
}

const COLS: usize = 4;
/// Clamp of the tail masses, as in the composite.
const EPS: f64 = 1e-12;

/// Per-token top-k KL `[..]` of student logits `[.., V]` against teacher `ids` (u32) and
/// log-probs `lpt` `[.., k]`, differentiable w.r.t. the student only.
pub fn per_token(student: &Tensor, ids: &Tensor, lpt: &Tensor, tail: TopkTail, t: f64) -> Result<Tensor> {
    let zs = student.contiguous()?;
    let ids = ids.to_dtype(candle_core::DType::U32)?.contiguous()?;
    let lpt = lpt.detach().to_dtype(zs.dtype())?.contiguous()?;
    let (sd, id) = (zs.dims(), ids.dims());
    if sd.len() != id.len() || sd[..sd.len() - 1] != id[..id.len() - 1] || ids.dims() != lpt.dims() {
        bail!(
            "top-k KL: student {:?}, ids {:?} and log-probs {:?} disagree",
            sd,
            id,
            lpt.dims()
        )
    }
    let out = zs.apply_op3(&ids, &lpt, TopkFwd { tail, inv_t: 1.0 / t })?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

struct TopkFwd {
    tail: TopkTail,
    inv_t: f64,
}

struct TopkBwd {
    tail: TopkTail,
    inv_t: f64,
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

impl CustomOp3 for TopkFwd {
    fn name(&self) -> &'static str {
        "fused-topk-kl"
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
            "fused-topk-kl",
            &[s1],
            || fwd_typed::<f32>(self, st),
            || fwd_typed::<f64>(self, st),
        )
    }

    fn bwd(
        &self,
        z: &Tensor,
        ids: &Tensor,
        lpt: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.narrow(D::Minus1, 0, 1)?;
        let aux = Tensor::cat(&[&res.detach(), &g], D::Minus1)?;
        // The ids stay a u32 input of their own; the teacher log-probs and the row statistics
        // travel packed in one tensor of the student's dtype.
        let packed = Tensor::cat(&[&lpt.detach(), &aux], D::Minus1)?.contiguous()?;
        let op = TopkBwd {
            tail: self.tail,
            inv_t: self.inv_t,
        };
        let gz = z.detach().apply_op3_no_bwd(ids, &packed, &op)?;
        Ok((Some(gz), None, None))
    }
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

impl CustomOp3 for TopkBwd {
    fn name(&self) -> &'static str {
        "fused-topk-kl-grad"
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
            "fused-topk-kl-grad",
            &[s1],
            || bwd_typed::<f32>(self, st),
            || bwd_typed::<f64>(self, st),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::losses::topk_kl::{topk_per_token, Tail};
    use crate::models::nn::log_softmax_last;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};
    use retort_core::model::dense_topk;

    fn logits(rows: usize, v: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f64> = (0..rows * v).map(|_| rng.random_range(-4.0..4.0)).collect();
        Tensor::from_vec(x, (2, rows / 2, v), &Device::Cpu).expect("logits")
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec")
    }

    fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor) -> (Vec<f64>, Vec<f64>) {
        let var = Var::from_tensor(z).expect("var");
        let per = f(var.as_tensor());
        let n = per.elem_count();
        let w: Vec<f64> = (0..n).map(|i| 0.25 + (i % 4) as f64).collect();
        let w = Tensor::from_vec(w, per.dims(), &Device::Cpu)
            .and_then(|w| w.to_dtype(per.dtype()))
            .expect("w");
        let g = (per.clone() * w)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.backward())
            .expect("bwd");
        (flat(&per), flat(g.get(var.as_tensor()).expect("grad")))
    }

    fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= rel * scale, "{what}[{i}]: fused {x} vs composite {y}");
        }
    }

    #[test]
    fn matches_composite_values_and_gradients() {
        for (tail, t, v, k) in [
            (TopkTail::Bucket, 1.0, 300, 16),
            (TopkTail::Bucket, 1.0, 9, 9),
            (TopkTail::Renormalize, 2.0, 300, 16),
            (TopkTail::Renormalize, 0.8, 40, 5),
        ] {
            let zs = logits(6, v, 11);
            let zt = logits(6, v, 12);
            let (ids, lp) = dense_topk(&zt, k).expect("topk");
            let lp = lp.to_dtype(DType::F64).expect("f64");
            let ctail = if tail == TopkTail::Bucket {
                Tail::Bucket
            } else {
                Tail::Renormalize
            };
            let composite = |z: &Tensor| {
                let ls = log_softmax_last(&(z / t).expect("div")).expect("lsm");
                topk_per_token(&ls, &ids, &lp, None, ctail, t).expect("composite")
            };
            let (cv, cg) = value_and_grad(composite, &zs);
            let (fv, fg) = value_and_grad(|z| per_token(z, &ids, &lp, tail, t).expect("fused"), &zs);
            assert_close(&format!("{tail:?} V={v} value"), &fv, &cv, 1e-10);
            assert_close(&format!("{tail:?} V={v} grad"), &fg, &cg, 1e-10);
            let zs32 = zs.to_dtype(DType::F32).expect("f32");
            let (fv, fg) = value_and_grad(|z| per_token(z, &ids, &lp, tail, t).expect("fused"), &zs32);
            assert_close(&format!("{tail:?} V={v} f32 value"), &fv, &cv, 1e-5);
            assert_close(&format!("{tail:?} V={v} f32 grad"), &fg, &cg, 1e-5);
        }
    }

    #[test]
    fn skipped_entries_match_the_composite_validity_mask() {
        let zs = logits(4, 30, 21);
        let zt = logits(4, 30, 22);
        let (ids, lp) = dense_topk(&zt, 6).expect("topk");
        let lp = lp.to_dtype(DType::F64).expect("f64");
        // Drop entries 1 and 4 of every row.
        let mask: Vec<f64> = (0..4 * 6)
            .map(|i| if i % 6 == 1 || i % 6 == 4 { 0.0 } else { 1.0 })
            .collect();
        let valid = Tensor::from_vec(mask, (2, 2, 6), &Device::Cpu).expect("m");
        let neg = Tensor::full(f64::NEG_INFINITY, lp.dims(), &Device::Cpu).expect("inf");
        let lp_marked = valid.ne(0.0).and_then(|m| m.where_cond(&lp, &neg)).expect("where");
        for (tail, ctail) in [
            (TopkTail::Bucket, Tail::Bucket),
            (TopkTail::Renormalize, Tail::Renormalize),
        ] {
            let composite = |z: &Tensor| {
                let ls = log_softmax_last(z).expect("lsm");
                topk_per_token(&ls, &ids, &lp, Some(&valid), ctail, 1.0).expect("composite")
            };
            let (cv, cg) = value_and_grad(composite, &zs);
            let (fv, fg) = value_and_grad(|z| per_token(z, &ids, &lp_marked, tail, 1.0).expect("fused"), &zs);
            assert_close(&format!("{tail:?} value"), &fv, &cv, 1e-9);
            assert_close(&format!("{tail:?} grad"), &fg, &cg, 1e-9);
        }
    }

    #[test]
    fn out_of_range_ids_are_an_error() {
        let zs = logits(2, 5, 1);
        let ids = Tensor::new(&[[[7u32]]], &Device::Cpu).expect("ids");
        let ids = ids.broadcast_as((2, 1, 1)).and_then(|i| i.contiguous()).expect("b");
        let lp = Tensor::zeros((2, 1, 1), DType::F64, &Device::Cpu).expect("lp");
        let err = per_token(&zs, &ids, &lp, TopkTail::Bucket, 1.0).expect_err("must fail");
        assert!(err.to_string().contains("outside the student's vocabulary"), "{err}");
    }
}
