//! Fused per-token divergences between tempered student and teacher distributions, with their
//! gradient w.r.t. the student logits: forward KL, reverse KL and generalized JSD.
//!
//! With `a = z_s / T`, `b = z_t / T`, `ls = log_softmax(a)`, `lt = log_softmax(b)`,
//! `p_s = e^ls`, `p_t = e^lt`, per row (token):
//!
//! - forward: `D = sum_v p_t (lt - ls)`, `dD/da_u = p_s,u - p_t,u`;
//! - reverse: `D = sum_v p_s (ls - lt)`, `dD/da_u = p_s,u (ls_u - lt_u - D)`;
//! - jsd(beta), `m = beta p_t + (1 - beta) p_s`:
//!   `D = beta KL(p_t || m) + (1 - beta) KL(p_s || m)`,
//!   `dD/da_u = p_s,u (g_u - sum_v p_s,v g_v)` with `g_v = (1 - beta)(ls_v - ln m_v)`;
//!
//! and `dD/dz_s = dD/da / T`. The teacher gets no gradient.
//!
//! Forward: per row, one pass for both maxima and one for the `exp` sums (plus one for JSD);
//! the output is `[.., 4]` = `(D, lse_a, lse_b, aux)` so that the backward pass is a single
//! sweep that writes `grad_D * dD/dz_s`. Sums are accumulated in f64; rows run in parallel.
//! Nothing `[rows, vocab]`-sized is kept between forward and backward.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

use super::fastmath::{reduce2, row_max, Real, BLOCK, LANES};
use super::rows::{by_dtype, for_rows, output_vec, rows_width, slice, with_last};

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Which divergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p_t || p_s)`.
    Forward,
    /// `KL(p_s || p_t)`.
    Reverse,
    /// Generalized JSD with `0 < beta < 1` (use `Forward`/`Reverse` at the ends).
    Jsd(f64),
}

const COLS: usize = 4;

/// Per-token divergence `[..]` of student logits `[.., V]` from teacher logits `[.., V]` at
/// temperature `t`, differentiable w.r.t. the student. Both must be f32 or f64 on the CPU
/// (see [`super::fusable`]); the teacher is cast to the student's dtype.
pub fn per_token(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<Tensor> {
    let (zs, zt, op) = prepare(student, teacher, t, kind)?;
    let out = zs.apply_op2(&zt, op)?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

struct DivergenceFwd {
    kind: Divergence,
    inv_t: f64,
}

impl DivergenceFwd {
    /// `g_r * dD_r/dz_s` from the forward's row statistics `res` `[.., 4]` and `g` `[.., 1]`.
    fn student_grad(&self, zs: &Tensor, zt: &Tensor, res: &Tensor, g: &Tensor) -> Result<Tensor> {
        let aux = Tensor::cat(&[&res.detach(), &g.to_dtype(res.dtype())?], D::Minus1)?.contiguous()?;
        let op = DivergenceBwd {
            kind: self.kind,
            inv_t: self.inv_t,
        };
        zs.detach().apply_op3_no_bwd(&zt.detach(), &aux, &op)
    }
}

/// [`per_token`] and its weighted gradient without autograd: `(D [..], sum_r w_r dD_r/dz_s)`
/// for per-token weights `w` `[..]` — the two fused sweeps alone, for callers that drive their
/// own backward, and to measure the kernels apart from candle's gradient bookkeeping.
pub fn per_token_and_grad(
    student: &Tensor,
    teacher: &Tensor,
    t: f64,
    kind: Divergence,
    weights: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (zs, zt, op) = prepare(student, teacher, t, kind)?;
    let res = zs.apply_op2_no_bwd(&zt, &op)?;
    let grad = op.student_grad(&zs, &zt, &res, &weights.unsqueeze(D::Minus1)?)?;
    Ok((res.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?, grad))
}

/// Both logit tensors contiguous in the student's dtype, and the forward op.
fn prepare(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<(Tensor, Tensor, DivergenceFwd)> {
    if student.dims() != teacher.dims() {
        bail!(
            "student logits {:?} and teacher logits {:?} differ in shape",
            student.dims(),
            teacher.dims()
        )
    }
    let kind = match kind {
        Divergence::Jsd(b) if b <= 0.0 => Divergence::Forward,
        Divergence::Jsd(b) if b >= 1.0 => Divergence::Reverse,
        k => k,
    };
    let zs = student.contiguous()?;
    let zt = teacher.detach().to_dtype(zs.dtype())?.contiguous()?;
    Ok((zs, zt, DivergenceFwd { kind, inv_t: 1.0 / t }))
}

struct DivergenceBwd {
    kind: Divergence,
    inv_t: f64,
}

/// `p * x`, 0 where `p == 0` (so `0 * -inf` is 0, the limit of `p ln p`).
#[inline(always)]
fn pmul<T: Real>(p: T, x: T) -> T {
    if p > T::ZERO {
        p * x
    } else {
        T::ZERO
    }
}

/// Row maxima of `a = zs * it` and `b = zt * it` (`it > 0`).
#[inline(always)]
fn maxima<T: Real>(zs: &[T], zt: &[T], it: T) -> (T, T) {
    (row_max(zs) * it, row_max(zt) * it)
}

#[inline(always)]
fn fwd_row<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], out: &mut [T]) {
    let (ma, mb) = maxima(zs, zt, it);
    // One sweep: sa = sum e^{a'}, sb = sum e^{b'}, and the cross sum of forward/reverse KL
    // over the shifted logits a' = a - ma, b' = b - mb.
    let reverse = kind == Divergence::Reverse;
    let [sa, sb, sx] = reduce2(zs, zt, |s, t| {
        let a = s * it - ma;
        let b = t * it - mb;
        let ea = a.exp();
        let eb = b.exp();
        let x = if reverse { pmul(ea, a - b) } else { pmul(eb, b - a) };
        [ea, eb, x]
    });
    let (lsa, lsb) = (sa.ln(), sb.ln());
    let lse_a = ma.to_f64() + lsa;
    let lse_b = mb.to_f64() + lsb;
    let (d, aux) = match kind {
        // sum p_t (lt - ls) with lt = b' - ln sb, ls = a' - ln sa.
        Divergence::Forward => (sx / sb - lsb + lsa, 0.0),
        Divergence::Reverse => (sx / sa - lsa + lsb, 0.0),
        Divergence::Jsd(beta) => jsd_row(beta, it, zs, zt, T::from_f64(lse_a), T::from_f64(lse_b)),
    };
    out[0] = T::from_f64(d);
    out[1] = T::from_f64(lse_a);
    out[2] = T::from_f64(lse_b);
    out[3] = T::from_f64(aux);
}

/// `(D, sum_v p_s g_v)` of JSD for one row, given both log-normalisers.
#[inline(always)]
fn jsd_row<T: Real>(beta: f64, it: T, zs: &[T], zt: &[T], lse_a: T, lse_b: T) -> (f64, f64) {
    let (bt, bs) = (T::from_f64(beta), T::from_f64(1.0 - beta));
    // The element function is written out inline (not as a closure passed to `reduce2`): with
    // two `exp` and one `ln` LLVM would not inline the closure, and the loop would not vectorise.
    let (mut d, mut s1) = (0f64, 0f64);
    for (bs_, bt_) in zs.chunks(BLOCK).zip(zt.chunks(BLOCK)) {
        let (mut ad, mut as1) = ([T::ZERO; LANES], [T::ZERO; LANES]);
        let (cs, ct) = (bs_.chunks_exact(LANES), bt_.chunks_exact(LANES));
        let (rs, rt) = (cs.remainder(), ct.remainder());
        for (cs, ct) in cs.zip(ct) {
            for i in 0..LANES {
                let ls = cs[i] * it - lse_a;
                let lt = ct[i] * it - lse_b;
                let (ps, pt) = (ls.exp(), lt.exp());
                let lm = (bt * pt + bs * ps).ln();
                let gs = pmul(ps, ls - lm);
                ad[i] = ad[i] + bt * pmul(pt, lt - lm) + bs * gs;
                as1[i] = as1[i] + bs * gs;
            }
        }
        for (&s, &t) in rs.iter().zip(rt) {
            let ls = s * it - lse_a;
            let lt = t * it - lse_b;
            let (ps, pt) = (ls.exp(), lt.exp());
            let lm = (bt * pt + bs * ps).ln();
            let gs = pmul(ps, ls - lm);
            d += (bt * pmul(pt, lt - lm) + bs * gs).to_f64();
            s1 += (bs * gs).to_f64();
        }
        d += ad.iter().map(|v| v.to_f64()).sum::<f64>();
        s1 += as1.iter().map(|v| v.to_f64()).sum::<f64>();
    }
    (d, s1)
}

/// `g * dD/dz_s` for one row; `aux = (D, lse_a, lse_b, aux, g)`.
#[inline(always)]
fn bwd_row<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], aux: &[T], out: &mut [T]) {
    let (d, lse_a, lse_b, s1, g) = (aux[0], aux[1], aux[2], aux[3], aux[4]);
    let gi = g * it;
    match kind {
        Divergence::Forward => {
            for ((o, &s), &t) in out.iter_mut().zip(zs).zip(zt) {
                *o = gi * ((s * it - lse_a).exp() - (t * it - lse_b).exp());
            }
        }
        Divergence::Reverse => {
            for ((o, &s), &t) in out.iter_mut().zip(zs).zip(zt) {
                let ls = s * it - lse_a;
                let lt = t * it - lse_b;
                *o = gi * pmul(ls.exp(), ls - lt - d);
            }
        }
        Divergence::Jsd(beta) => {
            let (bt, bs) = (T::from_f64(beta), T::from_f64(1.0 - beta));
            for ((o, &s), &t) in out.iter_mut().zip(zs).zip(zt) {
                let ls = s * it - lse_a;
                let lt = t * it - lse_b;
                let (ps, pt) = (ls.exp(), lt.exp());
                let lm = (bt * pt + bs * ps).ln();
                *o = gi * pmul(ps, bs * (ls - lm) - s1);
            }
        }
    }
}

avx512_dispatch!(fwd_row_any, fwd_row_avx512, fwd_row, (kind: Divergence, it: T, zs: &[T], zt: &[T], out: &mut [T]));
avx512_dispatch!(bwd_row_any, bwd_row_avx512, bwd_row, (kind: Divergence, it: T, zs: &[T], zt: &[T], aux: &[T], out: &mut [T]));

/// The forward over all rows: `row(zs_row, zt_row, next, out_row)` writes each row's `COLS`;
/// `next` is the following row pair (empty after the last), for prefetching.
fn fwd_typed<T: Real>(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    row: impl Fn(&[T], &[T], (&[T], &[T]), &mut [T]) + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let zs = slice::<T>(s1, l1, "student logits")?;
    let zt = slice::<T>(s2, l2, "teacher logits")?;
    let (rows, v) = rows_width(l1.shape())?;
    let mut out = vec![T::ZERO; rows * COLS];
    let part = |r: usize| (&zs[r * v..(r + 1) * v], &zt[r * v..(r + 1) * v]);
    for_rows(&mut out, COLS, 2 * v, |r, o| {
        let (s, t) = part(r);
        row(s, t, if r + 1 < rows { part(r + 1) } else { (&[], &[]) }, o)
    });
    Ok((T::storage(out), with_last(l1.shape(), COLS)))
}

/// The f32 forward: the AVX-512 rows where the CPU has them, else the generic ones.
fn fwd_f32(op: &DivergenceFwd, st: [(&CpuStorage, &Layout); 2]) -> Result<(CpuStorage, Shape)> {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        let (kind, it) = (op.kind, op.inv_t as f32);
        return fwd_typed::<f32>(st[0].0, st[0].1, st[1].0, st[1].1, |zs, zt, next, o| {
            // SAFETY: `available` checked that the CPU has AVX-512F and FMA.
            #[allow(unsafe_code)]
            unsafe {
                avx512::fwd_row(kind, it, zs, zt, next, o)
            }
        });
    }
    fwd_generic::<f32>(op, st)
}

/// [`fwd_typed`] with the generic rows.
fn fwd_generic<T: Real>(op: &DivergenceFwd, st: [(&CpuStorage, &Layout); 2]) -> Result<(CpuStorage, Shape)> {
    let it = T::from_f64(op.inv_t);
    fwd_typed::<T>(st[0].0, st[0].1, st[1].0, st[1].1, |zs, zt, _, o| {
        fwd_row_any(op.kind, it, zs, zt, o)
    })
}

impl CustomOp2 for DivergenceFwd {
    fn name(&self) -> &'static str {
        "fused-divergence"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("fused-divergence: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
        }
        let st = [(s1, l1), (s2, l2)];
        by_dtype(
            "fused-divergence",
            &[s1, s2],
            || fwd_f32(self, st),
            || fwd_generic::<f64>(self, st),
        )
    }

    fn bwd(&self, zs: &Tensor, zt: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only column 0 (D) of the output is ever read downstream; its gradient is all that
        // matters (the other columns get zeros from `narrow`'s backward).
        let g = grad.narrow(D::Minus1, 0, 1)?;
        Ok((Some(self.student_grad(zs, zt, res, &g)?), None))
    }
}

/// The backward over all rows, `row(zs_row, zt_row, aux_row, out_row)` writing each row.
fn bwd_typed<T: Real>(
    st: [(&CpuStorage, &Layout); 3],
    row: impl Fn(&[T], &[T], &[T], &mut [T]) + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let zs = slice::<T>(st[0].0, st[0].1, "student logits")?;
    let zt = slice::<T>(st[1].0, st[1].1, "teacher logits")?;
    let aux = slice::<T>(st[2].0, st[2].1, "saved row statistics")?;
    let (_, v) = rows_width(st[0].1.shape())?;
    let w = COLS + 1;
    let mut out = output_vec(zs.len());
    for_rows(&mut out, v, 2 * v, |r, o| {
        row(
            &zs[r * v..(r + 1) * v],
            &zt[r * v..(r + 1) * v],
            &aux[r * w..(r + 1) * w],
            o,
        )
    });
    Ok((T::storage(out), st[0].1.shape().clone()))
}

/// The f32 backward: the AVX-512 rows where the CPU has them, else the generic ones.
fn bwd_f32(op: &DivergenceBwd, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        let (kind, it) = (op.kind, op.inv_t as f32);
        return bwd_typed::<f32>(st, |zs, zt, aux, o| {
            // SAFETY: `available` checked that the CPU has AVX-512F and FMA.
            #[allow(unsafe_code)]
            unsafe {
                avx512::bwd_row(kind, it, zs, zt, aux, o)
            }
        });
    }
    bwd_generic::<f32>(op, st)
}

/// [`bwd_typed`] with the generic rows.
fn bwd_generic<T: Real>(op: &DivergenceBwd, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let it = T::from_f64(op.inv_t);
    bwd_typed::<T>(st, |zs, zt, aux, o| bwd_row_any(op.kind, it, zs, zt, aux, o))
}

impl CustomOp3 for DivergenceBwd {
    fn name(&self) -> &'static str {
        "fused-divergence-grad"
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
            "fused-divergence-grad",
            &[s1, s2, s3],
            || bwd_f32(self, st),
            || bwd_generic::<f64>(self, st),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::values;
    use crate::losses::jsd::jsd_per_token;
    use crate::losses::kl::forward_kl_from_log_probs;
    use crate::losses::logit::tempered_log_probs;
    use crate::losses::reverse_kl::reverse_kl_per_token;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn logits(rows: usize, v: usize, seed: u64, dtype: DType) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let x: Vec<f64> = (0..rows * v).map(|_| rng.random_range(-4.0..4.0)).collect();
        Tensor::from_vec(x, (2, rows / 2, v), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("logits")
    }

    fn composite(zs: &Tensor, zt: &Tensor, t: f64, kind: Divergence) -> Tensor {
        let (ls, lt) = tempered_log_probs(zs, zt, t).expect("lp");
        match kind {
            Divergence::Forward => forward_kl_from_log_probs(&ls, &lt),
            Divergence::Reverse => reverse_kl_per_token(&ls, &lt),
            Divergence::Jsd(b) => jsd_per_token(&ls, &lt, b),
        }
        .expect("composite")
    }

    /// Weighted sum of per-token values (non-uniform token weights), with the gradient.
    fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor) -> (Vec<f64>, Vec<f64>) {
        let var = Var::from_tensor(z).expect("var");
        let per = f(var.as_tensor());
        let (b, s) = per.dims2().expect("2d");
        let w: Vec<f64> = (0..b * s).map(|i| 0.5 + (i % 3) as f64).collect();
        let w = Tensor::from_vec(w, (b, s), &Device::Cpu)
            .and_then(|w| w.to_dtype(per.dtype()))
            .expect("w");
        let loss = (per.clone() * w).and_then(|x| x.sum_all()).expect("loss");
        let g = loss.backward().expect("bwd");
        let grad = g.get(var.as_tensor()).expect("grad");
        let flat = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("vec")
        };
        (flat(&per), flat(grad))
    }

    fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= rel * scale,
                "{what}[{i}]: fused {x} vs composite {y} (scale {scale})"
            );
        }
    }

    #[test]
    fn matches_composite_values_and_gradients() {
        for kind in [
            Divergence::Forward,
            Divergence::Reverse,
            Divergence::Jsd(0.3),
            Divergence::Jsd(0.9),
        ] {
            for (t, v) in [(1.0, 37), (2.0, 1000), (0.7, 5)] {
                let zs = logits(6, v, 1, DType::F64);
                let zt = logits(6, v, 2, DType::F64);
                let (fv, fg) = value_and_grad(|z| per_token(z, &zt, t, kind).expect("fused"), &zs);
                let (cv, cg) = value_and_grad(|z| composite(z, &zt, t, kind), &zs);
                assert_close(&format!("{kind:?} T={t} V={v} value"), &fv, &cv, 1e-10);
                assert_close(&format!("{kind:?} T={t} V={v} grad"), &fg, &cg, 1e-10);
                // f32 (fast exp/ln) against the f64 composite.
                let (fv, fg) = value_and_grad(
                    |z| per_token(z, &zt.to_dtype(DType::F32).expect("f32"), t, kind).expect("fused"),
                    &zs.to_dtype(DType::F32).expect("f32"),
                );
                assert_close(&format!("{kind:?} T={t} V={v} f32 value"), &fv, &cv, 1e-5);
                assert_close(&format!("{kind:?} T={t} V={v} f32 grad"), &fg, &cg, 1e-5);
            }
        }
    }

    #[test]
    fn value_and_grad_without_autograd_match_backward() {
        for dtype in [DType::F32, DType::F64] {
            for kind in [Divergence::Forward, Divergence::Reverse, Divergence::Jsd(0.4)] {
                let zs = logits(8, 301, 5, dtype);
                let zt = logits(8, 301, 6, dtype);
                let w = Tensor::from_vec(
                    (0..8).map(|i| 0.25 + i as f64).collect::<Vec<_>>(),
                    (2, 4),
                    &Device::Cpu,
                )
                .and_then(|w| w.to_dtype(dtype))
                .expect("w");
                let (d, g) = per_token_and_grad(&zs, &zt, 1.5, kind, &w).expect("direct");
                let var = Var::from_tensor(&zs).expect("var");
                let per = per_token(var.as_tensor(), &zt, 1.5, kind).expect("per");
                let grads = (per.clone() * &w)
                    .and_then(|x| x.sum_all())
                    .and_then(|x| x.backward())
                    .expect("bwd");
                let want = grads.get(var.as_tensor()).expect("grad");
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
                assert_close(&format!("{kind:?} {dtype:?} value"), &values(&d), &values(&per), tol);
                assert_close(&format!("{kind:?} {dtype:?} grad"), &values(&g), &values(want), tol);
            }
        }
    }

    #[test]
    fn teacher_gets_no_gradient_and_equal_inputs_give_zero() {
        let zs = Var::from_tensor(&logits(4, 50, 3, DType::F32)).expect("v");
        let zt = Var::from_tensor(&logits(4, 50, 4, DType::F32)).expect("v");
        let g = per_token(zs.as_tensor(), zt.as_tensor(), 2.0, Divergence::Forward)
            .and_then(|x| x.sum_all())
            .and_then(|x| x.backward())
            .expect("bwd");
        assert!(g.get(zs.as_tensor()).is_some());
        assert!(g.get(zt.as_tensor()).is_none());
        let same = per_token(zt.as_tensor(), zt.as_tensor(), 1.0, Divergence::Reverse)
            .and_then(|x| x.abs())
            .and_then(|x| x.max_all())
            .and_then(|x| x.to_scalar::<f32>())
            .expect("same");
        assert!(same < 1e-6, "{same}");
    }

    #[test]
    fn nan_logits_give_nan_and_masked_logits_are_zero_mass() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
        let zt = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
        x[3] = f32::NAN;
        let zs = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
        let d = per_token(&zs, &zt, 1.0, Divergence::Forward).expect("d");
        assert!(d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0].is_nan());
        // A vocabulary entry masked to -inf on both sides carries no mass and no NaN.
        x[3] = f32::NEG_INFINITY;
        let zs = Tensor::from_vec(x, (1, 1, 8), &Device::Cpu).expect("t");
        for kind in [Divergence::Forward, Divergence::Reverse, Divergence::Jsd(0.5)] {
            let d = per_token(&zs, &zs, 1.0, kind).expect("d");
            let d = d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0];
            assert!(d.abs() < 1e-6, "{kind:?}: {d}");
        }
    }
}
