//! The CPU divergences: rows on the rayon pool, sums in f64. The f32 rows of the kinds
//! `cpu_avx512.rs` implements ([`Avx512Kind`]: forward KL, reverse KL, JSD) run in AVX-512
//! intrinsics where the CPU has them; everything else (those kinds without AVX-512, f64, skew
//! KL and TVD in any dtype) runs the generic rows below, compiled for AVX-512 where it helps.

use candle_core::{bail, CpuStorage, Layout, Result, Shape};

use super::terms::{self, pmul, Terms};
use super::{Divergence, DivergenceBwd, DivergenceFwd, COLS};
use crate::kernels::cpu::fastmath::{reduce2, row_max, Real, BLOCK, LANES};
use crate::kernels::cpu::raw::{avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, for_rows, rows_width, slice, with_last};

/// The forward on student (`s1`) and teacher (`s2`) logits of one shape and dtype.
pub(super) fn fwd(
    op: &DivergenceFwd,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<(CpuStorage, Shape)> {
    if l1.shape() != l2.shape() {
        bail!("fused-divergence: shapes {:?} and {:?} differ", l1.shape(), l2.shape())
    }
    let (kind, it) = (op.kind, op.inv_t);
    let simd = Avx512Kind::of(kind);
    by_dtype(
        "fused-divergence",
        &[s1, s2],
        || {
            fwd_typed::<f32>(s1, l1, s2, l2, |zs, zt, next, o| match simd {
                Some(k) => fwd_row_f32(k, it as f32, zs, zt, next, o),
                None => fwd_row_any(kind, it as f32, zs, zt, next, o),
            })
        },
        || fwd_typed::<f64>(s1, l1, s2, l2, |zs, zt, next, o| fwd_row_any(kind, it, zs, zt, next, o)),
    )
}

/// The backward on `(student, teacher, (D, lse_a, lse_b, aux, g) per row)`.
pub(super) fn bwd(op: &DivergenceBwd, st: [(&CpuStorage, &Layout); 3]) -> Result<(CpuStorage, Shape)> {
    let (kind, it) = (op.kind, op.inv_t);
    let simd = Avx512Kind::of(kind);
    by_dtype(
        "fused-divergence-grad",
        &[st[0].0, st[1].0, st[2].0],
        || {
            bwd_typed::<f32>(st, |zs, zt, aux, o| match simd {
                Some(k) => bwd_row_f32(k, it as f32, zs, zt, aux, o),
                None => bwd_row_any(kind, it as f32, zs, zt, aux, o),
            })
        },
        || bwd_typed::<f64>(st, |zs, zt, aux, o| bwd_row_any(kind, it, zs, zt, aux, o)),
    )
}

/// The kinds with f32 rows in AVX-512 intrinsics (`cpu_avx512.rs` takes only these, so no
/// other kind can reach it); the others run the generic rows on every CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Avx512Kind {
    Forward,
    Reverse,
    Jsd(f64),
}

impl Avx512Kind {
    /// `kind`'s intrinsics rows, `None` for the kinds that take the generic rows.
    pub(super) fn of(kind: Divergence) -> Option<Self> {
        match kind {
            Divergence::Forward => Some(Avx512Kind::Forward),
            Divergence::Reverse => Some(Avx512Kind::Reverse),
            Divergence::Jsd(beta) => Some(Avx512Kind::Jsd(beta)),
            Divergence::SkewForward(_) | Divergence::SkewReverse(_) | Divergence::Tvd => None,
        }
    }

    /// The divergence these rows compute.
    fn kind(self) -> Divergence {
        match self {
            Avx512Kind::Forward => Divergence::Forward,
            Avx512Kind::Reverse => Divergence::Reverse,
            Avx512Kind::Jsd(beta) => Divergence::Jsd(beta),
        }
    }
}

/// Row maxima of `a = zs * it` and `b = zt * it` (`it > 0`).
#[inline(always)]
fn maxima<T: Real>(zs: &[T], zt: &[T], it: T) -> (T, T) {
    (row_max(zs) * it, row_max(zt) * it)
}

/// `out[..4] = (D, lse_a, lse_b, aux)` for one row (`_next`, the row pair the AVX-512 rows
/// prefetch, is not used here).
#[inline(always)]
fn fwd_row<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], _next: (&[T], &[T]), out: &mut [T]) {
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
        Divergence::Jsd(beta) => aux_row(&terms::Jsd::new(beta), it, zs, zt, lse_a, lse_b),
        Divergence::SkewForward(alpha) => aux_row(&terms::SkewForward::new(alpha), it, zs, zt, lse_a, lse_b),
        Divergence::SkewReverse(alpha) => aux_row(&terms::SkewReverse::new(alpha), it, zs, zt, lse_a, lse_b),
        Divergence::Tvd => aux_row(&terms::Tvd::new(), it, zs, zt, lse_a, lse_b),
    };
    out[0] = T::from_f64(d);
    out[1] = T::from_f64(lse_a);
    out[2] = T::from_f64(lse_b);
    out[3] = T::from_f64(aux);
}

/// `(D, aux) = (sum_v d_v, sum_v a_v)` of `terms` for one row (the second forward sweep),
/// given both log-normalisers.
#[inline(always)]
fn aux_row<T: Real>(terms: &impl Terms<T>, it: T, zs: &[T], zt: &[T], lse_a: f64, lse_b: f64) -> (f64, f64) {
    let (lse_a, lse_b) = (T::from_f64(lse_a), T::from_f64(lse_b));
    // The element terms are inlined methods, not a closure passed to `reduce2`: with two `exp`
    // and one `ln` LLVM would not inline the closure, and the loop would not vectorise.
    let (mut d, mut s1) = (0f64, 0f64);
    for (bs_, bt_) in zs.chunks(BLOCK).zip(zt.chunks(BLOCK)) {
        let (mut ad, mut as1) = ([T::ZERO; LANES], [T::ZERO; LANES]);
        let (cs, ct) = (bs_.chunks_exact(LANES), bt_.chunks_exact(LANES));
        let (rs, rt) = (cs.remainder(), ct.remainder());
        for (cs, ct) in cs.zip(ct) {
            for i in 0..LANES {
                let (dv, av) = terms.fwd(cs[i] * it - lse_a, ct[i] * it - lse_b);
                ad[i] = ad[i] + dv;
                as1[i] = as1[i] + av;
            }
        }
        for (&s, &t) in rs.iter().zip(rt) {
            let (dv, av) = terms.fwd(s * it - lse_a, t * it - lse_b);
            d += dv.to_f64();
            s1 += av.to_f64();
        }
        d += ad.iter().map(|v| v.to_f64()).sum::<f64>();
        s1 += as1.iter().map(|v| v.to_f64()).sum::<f64>();
    }
    (d, s1)
}

/// `g * dD/dz_s` for one row; `aux = (D, lse_a, lse_b, aux, g)`.
#[inline(always)]
fn bwd_row<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], aux: &[T], out: &mut [T]) {
    let (d, lse_a, lse_b, gi) = (aux[0], aux[1], aux[2], aux[4] * it);
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
        Divergence::Jsd(beta) => aux_grad(&terms::Jsd::new(beta), it, zs, zt, aux, out),
        Divergence::SkewForward(alpha) => aux_grad(&terms::SkewForward::new(alpha), it, zs, zt, aux, out),
        Divergence::SkewReverse(alpha) => aux_grad(&terms::SkewReverse::new(alpha), it, zs, zt, aux, out),
        Divergence::Tvd => aux_grad(&terms::Tvd::new(), it, zs, zt, aux, out),
    }
}

/// `g * dD/dz_s` of `terms` for one row; `aux = (D, lse_a, lse_b, aux, g)`.
#[inline(always)]
fn aux_grad<T: Real>(terms: &impl Terms<T>, it: T, zs: &[T], zt: &[T], aux: &[T], out: &mut [T]) {
    let (lse_a, lse_b, s1, gi) = (aux[1], aux[2], aux[3], aux[4] * it);
    for ((o, &s), &t) in out.iter_mut().zip(zs).zip(zt) {
        *o = gi * terms.grad(s * it - lse_a, t * it - lse_b, s1);
    }
}

avx512_dispatch!(fn fwd_row_any<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], next: (&[T], &[T]), out: &mut [T]) => fwd_row);
avx512_dispatch!(fn bwd_row_any<T: Real>(kind: Divergence, it: T, zs: &[T], zt: &[T], aux: &[T], out: &mut [T]) => bwd_row);
avx512_dispatch!(fn fwd_row_f32(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], next: (&[f32], &[f32]), out: &mut [f32]) => super::cpu_avx512::fwd_row, else fwd_row_f32_generic);
avx512_dispatch!(fn bwd_row_f32(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], aux: &[f32], out: &mut [f32]) => super::cpu_avx512::bwd_row, else bwd_row_f32_generic);

/// The generic f32 forward row of an [`Avx512Kind`], where the CPU lacks AVX-512.
fn fwd_row_f32_generic(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], next: (&[f32], &[f32]), out: &mut [f32]) {
    fwd_row(kind.kind(), it, zs, zt, next, out)
}

/// The generic f32 backward row of an [`Avx512Kind`], where the CPU lacks AVX-512.
fn bwd_row_f32_generic(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], aux: &[f32], out: &mut [f32]) {
    bwd_row(kind.kind(), it, zs, zt, aux, out)
}

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
