//! The divergence rows for f32 with AVX-512 FMA intrinsics, for the kinds of [`Avx512Kind`]
//! only (forward KL, reverse KL, JSD; skew KL and TVD have only the generic rows): the same
//! formulas, sweeps and f64 block accumulation as the generic rows of `cpu.rs`, with the
//! 13-instruction [`exp_ps`] and the FMA [`ln_ps`] (the generic rows spend most of their time
//! in the uncontracted Cephes `exp`/`ln`) and the gradient written with non-temporal stores (no
//! read-for-ownership of the 4 bytes per element the backward writes).

use std::arch::x86_64::*;

use super::cpu::Avx512Kind;
use crate::kernels::cpu::fastmath::BLOCK;
use crate::kernels::cpu::raw::avx512::{self as v, exp_ps, ln_ps, pmul_ps, W};

/// `out[..4] = (D, lse_a, lse_b, aux)` for one row (as the generic `fwd_row`). `next` is the row
/// pair this thread will likely take next: the `exp` sweep (which runs from L2, after the max
/// sweep brought the row pair in) prefetches it into L2 line by line, so that the next max
/// sweep does not wait on memory with the vector units idle.
#[target_feature(enable = "avx512f,fma")]
pub(super) fn fwd_row(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], next: (&[f32], &[f32]), out: &mut [f32]) {
    let reverse = kind == Avx512Kind::Reverse;
    let (ma, mb) = (v::row_max(zs) * it, v::row_max(zt) * it);
    let (itv, mav, mbv) = (_mm512_set1_ps(it), _mm512_set1_ps(ma), _mm512_set1_ps(mb));
    let n = zs.len().min(zt.len());
    let mut total = [_mm512_setzero_pd(); 3];
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK).min(n);
        let mut acc = [_mm512_setzero_ps(); 3];
        while i < end {
            let k = if i + W <= end { 0xffff } else { v::head_mask(end - i) };
            let (s, t) = (v::load(zs, i, k, 0.0), v::load(zt, i, k, 0.0));
            v::prefetch_l2(next.0, i);
            v::prefetch_l2(next.1, i);
            let a = _mm512_fmsub_ps(s, itv, mav);
            let b = _mm512_fmsub_ps(t, itv, mbv);
            let (ea, eb) = (exp_ps(a), exp_ps(b));
            let x = if reverse {
                pmul_ps(ea, _mm512_sub_ps(a, b))
            } else {
                pmul_ps(eb, _mm512_sub_ps(b, a))
            };
            acc[0] = _mm512_mask_add_ps(acc[0], k, acc[0], ea);
            acc[1] = _mm512_mask_add_ps(acc[1], k, acc[1], eb);
            acc[2] = _mm512_mask_add_ps(acc[2], k, acc[2], x);
            i += W;
        }
        i = end;
        for (t, a) in total.iter_mut().zip(acc) {
            *t = v::add_wide(*t, a);
        }
    }
    let [sa, sb, sx] = total.map(|t| _mm512_reduce_add_pd(t));
    let (lsa, lsb) = (sa.ln(), sb.ln());
    let (lse_a, lse_b) = ((ma as f64 + lsa) as f32, (mb as f64 + lsb) as f32);
    let (d, aux) = match kind {
        Avx512Kind::Forward => (sx / sb - lsb + lsa, 0.0),
        Avx512Kind::Reverse => (sx / sa - lsa + lsb, 0.0),
        Avx512Kind::Jsd(beta) => jsd_sums(beta, it, zs, zt, lse_a, lse_b),
    };
    out[0] = d as f32;
    out[1] = lse_a;
    out[2] = lse_b;
    out[3] = aux as f32;
}

/// The JSD terms of one element vector: `(ps, ls - lm, pt, lt - lm)` with `ls`, `lt` the log
/// probabilities and `lm = ln(beta pt + (1 - beta) ps)`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn jsd_terms(ls: __m512, lt: __m512, bt: __m512, bs: __m512) -> (__m512, __m512, __m512, __m512) {
    let (ps, pt) = (exp_ps(ls), exp_ps(lt));
    let lm = ln_ps(_mm512_fmadd_ps(bt, pt, _mm512_mul_ps(bs, ps)));
    (ps, _mm512_sub_ps(ls, lm), pt, _mm512_sub_ps(lt, lm))
}

/// `(D, sum_v p_s g_v)` of JSD for one row (as the generic `jsd_row`).
#[target_feature(enable = "avx512f,fma")]
fn jsd_sums(beta: f64, it: f32, zs: &[f32], zt: &[f32], lse_a: f32, lse_b: f32) -> (f64, f64) {
    let (bt, bs) = (_mm512_set1_ps(beta as f32), _mm512_set1_ps((1.0 - beta) as f32));
    let (itv, la, lb) = (_mm512_set1_ps(it), _mm512_set1_ps(lse_a), _mm512_set1_ps(lse_b));
    let n = zs.len().min(zt.len());
    let (mut total_d, mut total_s) = (_mm512_setzero_pd(), _mm512_setzero_pd());
    let mut i = 0;
    while i < n {
        let end = (i + BLOCK).min(n);
        let (mut acc_d, mut acc_s) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        while i < end {
            let k = if i + W <= end { 0xffff } else { v::head_mask(end - i) };
            let (s, t) = (v::load(zs, i, k, 0.0), v::load(zt, i, k, 0.0));
            let (ps, xs, pt, xt) = jsd_terms(_mm512_fmsub_ps(s, itv, la), _mm512_fmsub_ps(t, itv, lb), bt, bs);
            let gs = _mm512_mul_ps(bs, pmul_ps(ps, xs));
            let d = _mm512_fmadd_ps(bt, pmul_ps(pt, xt), gs);
            acc_d = _mm512_mask_add_ps(acc_d, k, acc_d, d);
            acc_s = _mm512_mask_add_ps(acc_s, k, acc_s, gs);
            i += W;
        }
        i = end;
        total_d = v::add_wide(total_d, acc_d);
        total_s = v::add_wide(total_s, acc_s);
    }
    (_mm512_reduce_add_pd(total_d), _mm512_reduce_add_pd(total_s))
}

/// `g * dD/dz_s` for one row, `aux = (D, lse_a, lse_b, aux, g)` (as the generic `bwd_row`).
#[target_feature(enable = "avx512f,fma")]
pub(super) fn bwd_row(kind: Avx512Kind, it: f32, zs: &[f32], zt: &[f32], aux: &[f32], out: &mut [f32]) {
    let (d, s1) = (_mm512_set1_ps(aux[0]), _mm512_set1_ps(aux[3]));
    // One monomorphised sweep per kind: a `match` inside the loop cost the forward KL's
    // backward 40%.
    match kind {
        Avx512Kind::Forward => bwd_sweep(it, zs, zt, aux, out, |ls, lt| _mm512_sub_ps(exp_ps(ls), exp_ps(lt))),
        Avx512Kind::Reverse => bwd_sweep(it, zs, zt, aux, out, |ls, lt| {
            pmul_ps(exp_ps(ls), _mm512_sub_ps(_mm512_sub_ps(ls, lt), d))
        }),
        Avx512Kind::Jsd(beta) => {
            let (bt, bs) = (_mm512_set1_ps(beta as f32), _mm512_set1_ps((1.0 - beta) as f32));
            // p_s,u ((1 - beta)(ls_u - lm_u) - s1)
            bwd_sweep(it, zs, zt, aux, out, |ls, lt| {
                let (ps, xs, _, _) = jsd_terms(ls, lt, bt, bs);
                pmul_ps(ps, _mm512_fmsub_ps(bs, xs, s1))
            })
        }
    }
}

/// `out = g it f(ls, lt)` over the row, `ls`, `lt` the tempered log-probabilities.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn bwd_sweep(it: f32, zs: &[f32], zt: &[f32], aux: &[f32], out: &mut [f32], f: impl Fn(__m512, __m512) -> __m512) {
    let itv = _mm512_set1_ps(it);
    let (la, lb) = (_mm512_set1_ps(aux[1]), _mm512_set1_ps(aux[2]));
    let gi = _mm512_set1_ps(aux[4] * it);
    let n = out.len().min(zs.len()).min(zt.len());
    v::stream_out(&mut out[..n], |i, k| {
        let (s, t) = (v::load(zs, i, k, 0.0), v::load(zt, i, k, 0.0));
        _mm512_mul_ps(gi, f(_mm512_fmsub_ps(s, itv, la), _mm512_fmsub_ps(t, itv, lb)))
    });
}
