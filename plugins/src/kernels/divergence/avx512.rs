//! The forward- and reverse-KL rows of [`super`] for f32 with AVX-512 FMA intrinsics: the same
//! formulas, sweeps and f64 block accumulation as the generic rows, with the 13-instruction
//! [`exp_ps`] (the generic rows spend most of their time in the uncontracted Cephes `exp`) and
//! the gradient written with non-temporal stores (no read-for-ownership of the 4 bytes per
//! element the backward writes). JSD keeps the generic rows.

use std::arch::x86_64::*;

use super::Divergence;
use crate::kernels::avx512::{self as v, exp_ps, pmul_ps, W};
use crate::kernels::fastmath::BLOCK;

/// Whether these rows run `kind` on this CPU.
pub fn handles(kind: Divergence) -> bool {
    matches!(kind, Divergence::Forward | Divergence::Reverse) && v::available()
}

/// `out[..4] = (D, lse_a, lse_b, 0)` for one row (see [`super::fwd_row`]). `next` is the row
/// pair this thread will likely take next: the `exp` sweep (which runs from L2, after the max
/// sweep brought the row pair in) prefetches it into L2 line by line, so that the next max
/// sweep does not wait on memory with the vector units idle.
#[target_feature(enable = "avx512f,fma")]
pub fn fwd_row(reverse: bool, it: f32, zs: &[f32], zt: &[f32], next: (&[f32], &[f32]), out: &mut [f32]) {
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
            // SAFETY: the lanes in `k` lie inside both rows (`i + lanes <= end <= n`).
            #[allow(unsafe_code)]
            let (s, t) = unsafe { (v::load(zs, i, k, 0.0), v::load(zt, i, k, 0.0)) };
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
    out[0] = if reverse {
        sx / sa - lsa + lsb
    } else {
        sx / sb - lsb + lsa
    } as f32;
    out[1] = (ma as f64 + lsa) as f32;
    out[2] = (mb as f64 + lsb) as f32;
    out[3] = 0.0;
}

/// `g * dD/dz_s` for one row, `aux = (D, lse_a, lse_b, _, g)` (see [`super::bwd_row`]).
#[target_feature(enable = "avx512f,fma")]
pub fn bwd_row(reverse: bool, it: f32, zs: &[f32], zt: &[f32], aux: &[f32], out: &mut [f32]) {
    let itv = _mm512_set1_ps(it);
    let (d, la, lb) = (_mm512_set1_ps(aux[0]), _mm512_set1_ps(aux[1]), _mm512_set1_ps(aux[2]));
    let gi = _mm512_set1_ps(aux[4] * it);
    let n = out.len().min(zs.len()).min(zt.len());
    v::stream_out(&mut out[..n], |i, k| {
        // SAFETY: `stream_out` passes only lanes inside `out`, which is as long as both rows.
        #[allow(unsafe_code)]
        let (s, t) = unsafe { (v::load(zs, i, k, 0.0), v::load(zt, i, k, 0.0)) };
        let ls = _mm512_fmsub_ps(s, itv, la);
        let lt = _mm512_fmsub_ps(t, itv, lb);
        let g = if reverse {
            pmul_ps(exp_ps(ls), _mm512_sub_ps(_mm512_sub_ps(ls, lt), d))
        } else {
            _mm512_sub_ps(exp_ps(ls), exp_ps(lt))
        };
        _mm512_mul_ps(gi, g)
    });
}
