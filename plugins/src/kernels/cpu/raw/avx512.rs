//! AVX-512 building blocks for the f32 kernels whose generic loops LLVM cannot make fast:
//! Rust never contracts `a * b + c` into a fused multiply-add, so the generic Cephes `exp`
//! ([`crate::kernels::cpu::fastmath::exp_f32`]) costs ~30 instructions per vector; [`exp_ps`] is
//! 13, and [`ln_ps`] splits its argument with `getmant`/`getexp` instead of bit twiddling.
//!
//! Every function here is compiled for AVX-512 (`#[target_feature]`) and safe to call from
//! code compiled for it: the ops' `cpu_avx512.rs` files, entered through
//! [`avx512_dispatch!`](super::avx512_dispatch) after [`available`] said yes (std caches the
//! detection). Arithmetic intrinsics are safe there; the pointer loads, stores and prefetches
//! are wrapped below as functions over slices that keep inside their bounds.

use std::arch::x86_64::*;

use half::f16;

/// Whether the CPU runs every feature the AVX-512 code is compiled for: AVX-512 F and DQ,
/// AVX2 and FMA.
#[inline]
pub fn available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

/// Lanes of one `__m512` of f32.
pub const W: usize = 16;

const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.3;

/// `e^x` on 16 lanes, with the semantics of [`crate::kernels::cpu::fastmath::exp_f32`]: ~2e-7 relative error,
/// exactly 0 below -87.3 (so `exp(-inf) = 0`), NaN in gives NaN out. The same Cephes reduction
/// `x = n ln2 + r` and degree-6 polynomial, with FMAs, `roundscale` for `n` and `scalef` for
/// the `2^n`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub fn exp_ps(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(EXP_LO);
    // max/min return their second operand when either is NaN: NaN passes through.
    let xc = _mm512_min_ps(_mm512_set1_ps(EXP_HI), _mm512_max_ps(lo, x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let out = _mm512_scalef_ps(y, n);
    // Not-less-than, unordered: true for NaN, so only x < -87.3 becomes 0.
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, lo), out)
}

/// `ln x` on 16 lanes, with the semantics of [`crate::kernels::cpu::fastmath::ln_f32`]: ~2e-7 relative error
/// for normal `x > 0`, `ln 0 = -inf`, `ln inf = inf`, NaN for `x < 0` and NaN. The same Cephes
/// split `x = m 2^e`, `m in [sqrt(1/2), sqrt(2))` (from `getmant`/`getexp`) and degree-9
/// polynomial in `f = m - 1`, with FMAs.
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub fn ln_ps(x: __m512) -> __m512 {
    let one = _mm512_set1_ps(1.0);
    // x = m 2^e with m in [1, 2); then m in [sqrt(1/2), sqrt(2)).
    let m = _mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(x);
    let e = _mm512_getexp_ps(x);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m, _mm512_set1_ps(std::f32::consts::SQRT_2));
    let m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5));
    let e = _mm512_mask_add_ps(e, big, e, one);
    let f = _mm512_sub_ps(m, one);
    let z = _mm512_mul_ps(f, f);
    let mut p = _mm512_set1_ps(7.037_683_6e-2);
    for c in [
        -1.151_461e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        0.333_333_34,
    ] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    // y = p f z + e ln2_lo - z / 2; ln x = f + y + e ln2_hi.
    let y = _mm512_fmadd_ps(
        _mm512_mul_ps(p, f),
        z,
        _mm512_mul_ps(e, _mm512_set1_ps(-2.121_944_4e-4)),
    );
    let y = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.5), y);
    let out = _mm512_fmadd_ps(e, _mm512_set1_ps(0.693_359_4), _mm512_add_ps(f, y));
    let zero = _mm512_setzero_ps();
    let inf = _mm512_set1_ps(f32::INFINITY);
    // Special cases, in the order the generic function checks them.
    let out = _mm512_mask_mov_ps(out, _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, inf), inf);
    let bad = _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(x, zero); // x < 0 or NaN
    let out = _mm512_mask_mov_ps(out, bad, _mm512_set1_ps(f32::NAN));
    _mm512_mask_mov_ps(
        out,
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, zero),
        _mm512_set1_ps(f32::NEG_INFINITY),
    )
}

/// `1 / d` on 16 lanes: the 14-bit `rcp14` estimate and one Newton step (~1e-8 relative), a
/// fraction of the cost of `vdivps`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub fn recip_ps(d: __m512) -> __m512 {
    let r = _mm512_rcp14_ps(d);
    _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
}

/// `o_i = f(x_i)` over 16-lane vectors (a masked vector for the tail).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn map1(o: &mut [f32], x: &[f32], mut f: impl FnMut(__m512) -> __m512) {
    let n = o.len().min(x.len());
    let mut i = 0;
    while i < n {
        let k = if i + W <= n { 0xffff } else { head_mask(n - i) };
        // SAFETY: the lanes in `k` lie inside `o` and `x` (`i + lanes <= n`).
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), k, f(load_unchecked(x, i, k, 0.0))) };
        i += W;
    }
}

/// `o_i = f(x_i, y_i)` over 16-lane vectors (a masked vector for the tail).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn map2(o: &mut [f32], x: &[f32], y: &[f32], mut f: impl FnMut(__m512, __m512) -> __m512) {
    let n = o.len().min(x.len()).min(y.len());
    let mut i = 0;
    while i < n {
        let k = if i + W <= n { 0xffff } else { head_mask(n - i) };
        // SAFETY: the lanes in `k` lie inside `o`, `x` and `y` (`i + lanes <= n`).
        unsafe {
            let (x, y) = (load_unchecked(x, i, k, 0.0), load_unchecked(y, i, k, 0.0));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), k, f(x, y))
        };
        i += W;
    }
}

/// `p * x` where `p > 0`, else 0 (so `0 * -inf` is 0, the limit of `p ln p`).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn pmul_ps(p: __m512, x: __m512) -> __m512 {
    _mm512_maskz_mul_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(p, _mm512_setzero_ps()), p, x)
}

/// The 16 lanes of `v` added into 8 f64 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn add_wide(acc: __m512d, v: __m512) -> __m512d {
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    _mm512_add_pd(acc, _mm512_add_pd(lo, hi))
}

/// The mask of the first `n` lanes (all 16 for `n >= 16`).
#[inline]
pub fn head_mask(n: usize) -> __mmask16 {
    ((1u32 << n.min(W)) - 1) as __mmask16
}

/// `max_v x_v`, NaN entries skipped (as [`crate::kernels::cpu::fastmath::row_max`]).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn row_max(x: &[f32]) -> f32 {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut acc = ninf;
    let mut chunks = x.chunks_exact(W);
    for c in &mut chunks {
        // SAFETY: `c` holds 16 f32.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        // `max(v, acc)` returns `acc` when `v` is NaN.
        acc = _mm512_max_ps(v, acc);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // SAFETY: the mask covers only the `rest.len()` readable elements.
        let v = unsafe { _mm512_mask_loadu_ps(ninf, head_mask(rest.len()), rest.as_ptr()) };
        acc = _mm512_max_ps(v, acc);
    }
    _mm512_reduce_max_ps(acc)
}

/// `x <- e^(x - max x)` in place (NaN entries skipped by the max, NaN out); returns the sum
/// of the new values, lane-wise in f32 within blocks of 512 and f64 across them.
#[target_feature(enable = "avx512f,fma")]
pub fn exp_shifted_sum(x: &mut [f32]) -> f64 {
    let m = _mm512_set1_ps(row_max(x));
    let mut total = _mm512_setzero_pd();
    for block in x.chunks_mut(crate::kernels::cpu::fastmath::BLOCK) {
        let mut acc = _mm512_setzero_ps();
        let n = block.len();
        let mut i = 0;
        while i < n {
            let k = if i + W <= n { 0xffff } else { head_mask(n - i) };
            // SAFETY: the lanes in `k` lie inside `block`.
            unsafe {
                let e = exp_ps(_mm512_sub_ps(load_unchecked(block, i, k, 0.0), m));
                _mm512_mask_storeu_ps(block.as_mut_ptr().add(i), k, e);
                acc = _mm512_mask_add_ps(acc, k, acc, e);
            }
            i += W;
        }
        total = add_wide(total, acc);
    }
    _mm512_reduce_add_pd(total)
}

/// Writes 16-lane vectors over `out` with non-temporal stores where the vector is 64-byte
/// aligned (no read-for-ownership of the destination: large outputs cost their size in memory
/// traffic, not twice it), masked ordinary stores at the unaligned head and the tail.
/// `f(i, k)` returns the vector for elements `i..i + 16`, of which the lanes in mask `k` are
/// inside `out` (it must not read past them). Ends with a store fence, so the rows are visible
/// to whichever thread reads them next.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn stream_out(out: &mut [f32], mut f: impl FnMut(usize, __mmask16) -> __m512) {
    let n = out.len();
    let p = out.as_mut_ptr();
    let misalign = (p as usize % 64) / 4;
    let head = if misalign == 0 { 0 } else { (W - misalign).min(n) };
    if head > 0 {
        let k = head_mask(head);
        // SAFETY: the mask covers elements 0..head of `out`.
        unsafe { _mm512_mask_storeu_ps(p, k, f(0, k)) };
    }
    let mut i = head;
    while i + W <= n {
        // SAFETY: `p + i` is 64-byte aligned and 16 elements of `out` follow it.
        unsafe { _mm512_stream_ps(p.add(i), f(i, 0xffff)) };
        i += W;
    }
    if i < n {
        let k = head_mask(n - i);
        // SAFETY: the mask covers the remaining `n - i` elements.
        unsafe { _mm512_mask_storeu_ps(p.add(i), k, f(i, k)) };
    }
    _mm_sfence();
}

/// Prefetches the cache line holding `x[i]` into L2 (nothing when `i` is past the end).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn prefetch_l2(x: &[f32], i: usize) {
    if i < x.len() {
        // SAFETY: the address is inside `x`; a prefetch never faults or changes memory.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(x.as_ptr().add(i).cast()) };
    }
}

/// 16 elements of `x` from `i` under mask `k`: masked-off lanes, and lanes past the end of
/// `x`, read as `fill` (the mask is cut to the elements that exist, so no read leaves `x`).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn load(x: &[f32], i: usize, k: __mmask16, fill: f32) -> __m512 {
    let k = k & head_mask(x.len().saturating_sub(i));
    // SAFETY: the lanes left in `k` lie inside `x`.
    unsafe { load_unchecked(x, i, k, fill) }
}

/// [`load`] without the bounds cut, for the loops here whose masks are inside their slices.
///
/// # Safety
/// The lanes in `k` must lie inside `x`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_unchecked(x: &[f32], i: usize, k: __mmask16, fill: f32) -> __m512 {
    // SAFETY: the caller's contract.
    unsafe {
        if k == 0xffff {
            _mm512_loadu_ps(x.as_ptr().add(i))
        } else {
            _mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, x.as_ptr().add(i))
        }
    }
}

/// Rows of one register block of [`gemm_rows`].
pub const GEMM_ROWS: usize = 4;

/// `c[r][0..n] = alpha * sum_{k0 <= kk < k1} a[r][kk] b[kk][0..n]` for the [`GEMM_ROWS`] rows
/// of `a`, element `a[r][kk]` at `a[r * lda + kk * ka]` (`ka = 1`: row-major rows; `lda = 1`,
/// `ka` the leading dim: a transpose read in place), `b` row-major (`ldb`), `c` row-major
/// (`ldc`), `n` a multiple of 16: the small products of the fused attention, with FMA
/// intrinsics (LLVM does not contract the generic loop's `acc + x * b` into fused multiply-adds,
/// which doubled its instruction count). Two `4 x 16` accumulator blocks (32 columns) per pass
/// where `n` allows, so each broadcast of `a` feeds two FMAs.
///
/// Panics when an access would leave `a`, `b` or `c` (checked once, before the loops).
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    a: &[f32],
    (lda, ka): (usize, usize),
    b: &[f32],
    ldb: usize,
    (k0, k1): (usize, usize),
    n: usize,
    c: &mut [f32],
    ldc: usize,
    alpha: f32,
) {
    const R: usize = GEMM_ROWS;
    assert!(n.is_multiple_of(W) && (n == 0 || (R - 1) * ldc + n <= c.len()));
    assert!(k1 <= k0 || ((R - 1) * lda + (k1 - 1) * ka < a.len() && (k1 - 1) * ldb + n <= b.len()));
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    let al = _mm512_set1_ps(alpha);
    let mut jc = 0;
    // SAFETY (all pointer reads and writes): inside the bounds asserted above.
    unsafe {
        while jc + 2 * W <= n {
            let mut acc = [_mm512_setzero_ps(); 2 * R];
            for kk in k0..k1 {
                let bp = b.add(kk * ldb + jc);
                let (b0, b1) = (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(W)));
                for r in 0..R {
                    let x = _mm512_set1_ps(*a.add(r * lda + kk * ka));
                    acc[2 * r] = _mm512_fmadd_ps(x, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(x, b1, acc[2 * r + 1]);
                }
            }
            for r in 0..R {
                let cp = c.add(r * ldc + jc);
                _mm512_storeu_ps(cp, _mm512_mul_ps(acc[2 * r], al));
                _mm512_storeu_ps(cp.add(W), _mm512_mul_ps(acc[2 * r + 1], al));
            }
            jc += 2 * W;
        }
        if jc < n {
            let mut acc = [_mm512_setzero_ps(); R];
            for kk in k0..k1 {
                let b0 = _mm512_loadu_ps(b.add(kk * ldb + jc));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * lda + kk * ka)), b0, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + jc), _mm512_mul_ps(*acc, al));
            }
        }
    }
}

/// `out[j * rows.len() + r] = sum_l rows[r][l] * ws[j][l]`: every row against every weight
/// row (each row at least as long as the weight rows, which share one length). Blocks of four
/// weight rows by up to four rows in sixteen registers, so each pass loads eight vectors for
/// sixteen FMAs (a last block of fewer rows computes only those); unmasked loads over the whole
/// 16-lane chunks, a masked one for the tail. The dot products of
/// [`few_rows`](crate::kernels::cpu::few_rows).
///
/// Panics when `out` is shorter than `ws.len() * rows.len()` or the lengths disagree.
#[target_feature(enable = "avx512f,fma")]
pub fn dot_rows(rows: &[&[f32]], ws: &[&[f32]], out: &mut [f32]) {
    let (m, k) = (rows.len(), ws.first().map_or(0, |w| w.len()));
    let fits = ws.iter().all(|w| w.len() == k) && rows.iter().all(|r| r.len() >= k);
    assert!(fits && out.len() >= ws.len() * m, "dot_rows: shapes");
    if m == 0 {
        return;
    }
    for (jb, wg) in ws.chunks(4).enumerate() {
        let w = |j: usize| wg[j.min(wg.len() - 1)];
        let ws4 = [w(0), w(1), w(2), w(3)];
        for (rb, rg) in rows.chunks(4).enumerate() {
            let sums = match rg.len() {
                1 => dot_block::<1>(ws4, [rg[0]], k),
                2 => dot_block::<2>(ws4, [rg[0], rg[1]], k),
                3 => dot_block::<3>(ws4, [rg[0], rg[1], rg[2]], k),
                _ => dot_block::<4>(ws4, [rg[0], rg[1], rg[2], rg[3]], k),
            };
            for j in 0..wg.len() {
                for r in 0..rg.len() {
                    out[(jb * 4 + j) * m + rb * 4 + r] = sums[j * 4 + r];
                }
            }
        }
    }
}

/// The `4 x R` dot products of `ws4` and `xs` over their first `k` elements (every slice holds
/// `k` or more, checked by [`dot_rows`]): lane `4 j + r` of the result, the rest 0.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn dot_block<const R: usize>(ws4: [&[f32]; 4], xs: [&[f32]; R], k: usize) -> [f32; 16] {
    let full = k / W * W;
    let tail = head_mask(k - full);
    let mut acc = [[_mm512_setzero_ps(); R]; 4];
    let mut i = 0;
    while i < full {
        // SAFETY: i + 16 <= full <= k, and every row and weight row holds k elements or more.
        let (wv, xv) = unsafe {
            (
                ws4.map(|w| _mm512_loadu_ps(w.as_ptr().add(i))),
                xs.map(|x| _mm512_loadu_ps(x.as_ptr().add(i))),
            )
        };
        for (a, wj) in acc.iter_mut().zip(wv) {
            for (b, xr) in a.iter_mut().zip(xv) {
                *b = _mm512_fmadd_ps(xr, wj, *b);
            }
        }
        i += W;
    }
    if tail != 0 {
        let wv = ws4.map(|w| load(w, full, tail, 0.0));
        let xv = xs.map(|x| load(x, full, tail, 0.0));
        for (a, wj) in acc.iter_mut().zip(wv) {
            for (b, xr) in a.iter_mut().zip(xv) {
                *b = _mm512_fmadd_ps(xr, wj, *b);
            }
        }
    }
    let at = |l: usize| {
        if l % 4 < R {
            acc[l / 4][l % 4]
        } else {
            _mm512_setzero_ps()
        }
    };
    lanes_of(reduce16(std::array::from_fn(at)))
}

/// The 16 horizontal sums of `v` at once: lane `i` of the result is the sum of the lanes of
/// `v[i]` (a tree of in-lane and cross-lane shuffles, 45 instructions instead of 16 separate
/// reductions of ~9).
#[inline]
#[target_feature(enable = "avx512f")]
pub fn reduce16(v: [__m512; 16]) -> __m512 {
    // Pairs (2i, 2i + 1) interleaved: each 128-bit lane holds two partials of each.
    let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let t: [__m512; 8] = std::array::from_fn(|i| pair(v[2 * i], v[2 * i + 1]));
    // Quads: each 128-bit lane holds one partial of each of 4 consecutive inputs.
    let quad = |a: __m512, b: __m512| {
        let (a, b) = (_mm512_castps_pd(a), _mm512_castps_pd(b));
        _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        )
    };
    let q: [__m512; 4] = std::array::from_fn(|i| quad(t[2 * i], t[2 * i + 1]));
    // Across 128-bit lanes: lanes (0, 1) of `a` and of `b`, then (2, 3).
    let cross = |a: __m512, b: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    };
    cross(cross(q[0], q[1]), cross(q[2], q[3]))
}

/// The 16 lanes of `v`.
#[inline]
#[target_feature(enable = "avx512f")]
pub fn lanes_of(v: __m512) -> [f32; 16] {
    let mut out = [0f32; 16];
    // SAFETY: `out` holds 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
    out
}

/// The first 16 halves of `h` (or all of them, the other lanes 0) widened to a vector.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
pub fn halves(h: &[f16]) -> __m512 {
    if h.len() >= W {
        // SAFETY: `h` holds 16 halves or more, the 256 bits loaded.
        return unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast())) };
    }
    // A short tail one by one (a copy into a buffer would call `memcpy` for every group).
    let mut f = [0f32; W];
    for (o, v) in f.iter_mut().zip(h) {
        *o = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v.to_bits() as i32)));
    }
    // SAFETY: `f` holds 16 floats.
    unsafe { _mm512_loadu_ps(f.as_ptr()) }
}

/// GGML 4-bit blocks to floats: block `b` (16 bytes of `q`, element `i` in the low nibble of
/// byte `i` and element `i + 16` in the high one) becomes `out[32 b..32 b + 32] = d[b] q + m[b]`,
/// a product then a sum (not a fused multiply-add), as GGML rounds it.
///
/// Panics unless `q` holds 16 bytes, `m` one offset and `out` 32 floats per scale in `d`.
#[target_feature(enable = "avx512f")]
pub fn dequantize_nibbles(q: &[u8], d: &[f16], m: &[f16], out: &mut [f32]) {
    let nb = d.len();
    assert!(
        q.len() == 16 * nb && m.len() == nb && out.len() == 32 * nb,
        "dequantize_nibbles: shapes"
    );
    let low = _mm512_set1_epi32(0x0F);
    for g in (0..nb).step_by(W) {
        let (ds, ms) = (lanes_of(halves(&d[g..])), lanes_of(halves(&m[g..])));
        for (b, (dg, mg)) in (g..nb).zip(ds.into_iter().zip(ms)) {
            // SAFETY: bytes 16 b..16 b + 16 of q and floats 32 b..32 b + 32 of out exist
            // (asserted, b < nb).
            unsafe {
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(16 * b).cast()));
                let (dv, mv) = (_mm512_set1_ps(dg), _mm512_set1_ps(mg));
                let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, low));
                let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v));
                let o = out.as_mut_ptr().add(32 * b);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_mul_ps(lo, dv), mv));
                _mm512_storeu_ps(o.add(16), _mm512_add_ps(_mm512_mul_ps(hi, dv), mv));
            }
        }
    }
}

/// GGML 8-bit blocks to floats: block `b` (32 signed bytes of `q`) becomes
/// `out[32 b..32 b + 32] = d[b] q`.
///
/// Panics unless `q` holds 32 bytes and `out` 32 floats per scale in `d`.
#[target_feature(enable = "avx512f")]
pub fn dequantize_bytes(q: &[u8], d: &[f16], out: &mut [f32]) {
    let nb = d.len();
    assert!(q.len() == 32 * nb && out.len() == 32 * nb, "dequantize_bytes: shapes");
    for g in (0..nb).step_by(W) {
        for (b, db) in (g..nb).zip(lanes_of(halves(&d[g..]))) {
            // SAFETY: bytes 32 b..32 b + 32 of q and floats 32 b..32 b + 32 of out exist
            // (asserted, b < nb).
            unsafe {
                let p = q.as_ptr().add(32 * b);
                let dv = _mm512_set1_ps(db);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16).cast())));
                let o = out.as_mut_ptr().add(32 * b);
                _mm512_storeu_ps(o, _mm512_mul_ps(lo, dv));
                _mm512_storeu_ps(o.add(16), _mm512_mul_ps(hi, dv));
            }
        }
    }
}

/// Dot products of one weight row of GGML blocks with `R` activation rows, without
/// dequantizing it to memory: `out[r] = sum_b d[b] (q_b . x_r[32 b..32 b + 32]) + sum_b m[b]
/// xsum_r[b]`, where `xsum_r[b]` is the sum of `x_r[32 b..32 b + 32]`. The codes are 32 signed
/// bytes per block when `BYTES` (GGML Q8_0, `m` unused), else 16 bytes of nibbles (element `i` in
/// the low nibble of byte `i`, `i + 16` in its high one). Equal to the dot products of the
/// dequantized row `d q + m` up to the order of the sums.
///
/// Panics unless `q` holds the codes of `d.len()` blocks, `m` one offset per block (nibbles),
/// and every `xs[r]` `32 d.len()` floats and `xsums[r]` `d.len()`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub fn block_dots<const R: usize, const BYTES: bool>(
    q: &[u8],
    d: &[f16],
    m: &[f16],
    xs: [&[f32]; R],
    xsums: [&[f32]; R],
) -> [f32; R] {
    let nb = d.len();
    assert!(
        q.len() == nb * if BYTES { 32 } else { 16 }
            && (BYTES || m.len() == nb)
            && xs.iter().all(|x| x.len() >= 32 * nb)
            && xsums.iter().all(|s| s.len() >= nb),
        "block_dots: shapes"
    );
    let (mut even, mut odd) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
    for g in (0..nb).step_by(W) {
        let ds = lanes_of(halves(&d[g..]));
        let end = (g + W).min(nb);
        let mut b = g;
        while b + 1 < end {
            // SAFETY: blocks b and b + 1 lie inside q and every x (asserted, b + 1 < nb).
            unsafe {
                even = block_step::<R, BYTES>(q, ds[b - g], xs, b, even);
                odd = block_step::<R, BYTES>(q, ds[b + 1 - g], xs, b + 1, odd);
            }
            b += 2;
        }
        if b < end {
            // SAFETY: block b lies inside q and every x (asserted, b < nb).
            even = unsafe { block_step::<R, BYTES>(q, ds[b - g], xs, b, even) };
        }
        if !BYTES {
            let (k, mv) = (head_mask(end - g), halves(&m[g..]));
            for (e, s) in even.iter_mut().zip(xsums) {
                *e = _mm512_fmadd_ps(mv, load(s, g, k, 0.0), *e);
            }
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r])))
}

/// `acc[r] += d (q_b . x_r[32 b..32 b + 32])` for block `b` of [`block_dots`].
///
/// # Safety
/// Block `b` must lie inside `q` and every `xs[r]`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
unsafe fn block_step<const R: usize, const BYTES: bool>(
    q: &[u8],
    d: f32,
    xs: [&[f32]; R],
    b: usize,
    mut acc: [__m512; R],
) -> [__m512; R] {
    // SAFETY: the caller's contract (the block's codes and 32 floats of each x exist).
    unsafe {
        let (lo, hi) = if BYTES {
            let p = q.as_ptr().add(32 * b);
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16).cast()));
            (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
        } else {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(16 * b).cast()));
            let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0F));
            (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)))
        };
        let dv = _mm512_set1_ps(d);
        for (a, x) in acc.iter_mut().zip(xs) {
            let p = x.as_ptr().add(32 * b);
            let t = _mm512_fmadd_ps(lo, _mm512_loadu_ps(p), _mm512_mul_ps(hi, _mm512_loadu_ps(p.add(16))));
            *a = _mm512_fmadd_ps(t, dv, *a);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::fastmath::{exp_f32, row_max as generic_max};

    fn lanes(v: __m512) -> [f32; 16] {
        // SAFETY: __m512 and [f32; 16] have the same size.
        unsafe { std::mem::transmute(v) }
    }

    #[test]
    fn reduce16_sums_each_input_into_its_lane() {
        if !available() {
            return;
        }
        let inputs: [[f32; 16]; 16] = std::array::from_fn(|i| std::array::from_fn(|l| (i * 16 + l) as f32 * 0.5 - 7.0));
        // SAFETY: the CPU has AVX-512F (checked above).
        let got = unsafe { lanes_of(reduce16(inputs.map(|a| _mm512_loadu_ps(a.as_ptr())))) };
        for (i, a) in inputs.iter().enumerate() {
            assert_eq!(got[i], a.iter().sum::<f32>(), "lane {i}");
        }
    }

    #[test]
    fn exp_matches_libm_and_the_generic_exp() {
        if !available() {
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.0007);
            // SAFETY: the CPU has AVX-512F and FMA (checked above).
            let got = lanes(unsafe { exp_ps(_mm512_loadu_ps(xs.as_ptr())) });
            for (g, &x) in got.iter().zip(&xs) {
                let want = (x as f64).exp();
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        let special = [
            f32::NEG_INFINITY,
            -100.0,
            -87.31,
            f32::NAN,
            0.0,
            1.0,
            100.0,
            f32::INFINITY,
        ];
        let mut xs = [0f32; 16];
        xs[..special.len()].copy_from_slice(&special);
        // SAFETY: as above.
        let got = lanes(unsafe { exp_ps(_mm512_loadu_ps(xs.as_ptr())) });
        for (g, &x) in got.iter().zip(&xs) {
            let want = exp_f32(x);
            assert!(
                (g.is_nan() && want.is_nan()) || (*g - want).abs() <= 4e-7 * want.abs(),
                "exp({x}): {g} vs generic {want}"
            );
        }
        assert_eq!(got[0], 0.0);
        assert_eq!(got[4], 1.0);
    }

    #[test]
    fn ln_matches_libm_and_the_generic_ln() {
        if !available() {
            return;
        }
        let mut worst = 0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let xs: [f32; 16] = std::array::from_fn(|i| x * (1.0 + i as f32 * 0.0007));
            // SAFETY: the CPU has AVX-512F and FMA (checked above).
            let got = lanes(unsafe { ln_ps(_mm512_loadu_ps(xs.as_ptr())) });
            for (g, &x) in got.iter().zip(&xs) {
                let want = (x as f64).ln();
                worst = worst.max((*g as f64 - want).abs() / want.abs().max(1.0));
            }
            x *= 1.0137;
        }
        assert!(worst < 4e-7, "worst error {worst}");
        let special = [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, 1.0, 1e-40, f32::MIN_POSITIVE];
        let mut xs = [1f32; 16];
        xs[..special.len()].copy_from_slice(&special);
        // SAFETY: as above.
        let got = lanes(unsafe { ln_ps(_mm512_loadu_ps(xs.as_ptr())) });
        assert_eq!(got[0], f32::NEG_INFINITY);
        assert_eq!(got[1], f32::NEG_INFINITY);
        assert!(got[2].is_nan() && got[3].is_nan());
        assert_eq!(got[4], f32::INFINITY);
        assert_eq!(got[5], 0.0);
        for (i, &x) in xs.iter().enumerate().skip(6).take(2) {
            let want = (x as f64).ln();
            assert!(
                (got[i] as f64 - want).abs() < 1e-5 * want.abs(),
                "ln({x}) = {} vs {want}",
                got[i]
            );
        }
    }

    #[test]
    fn load_reads_only_inside_its_slice() {
        if !available() {
            return;
        }
        let x: Vec<f32> = (0..20).map(|i| i as f32).collect();
        for (i, k, want_lanes) in [
            (0, 0xffff, 16),
            (16, 0xffff, 4),
            (18, 0x0003, 2),
            (20, 0xffff, 0),
            (25, 0xffff, 0),
        ] {
            // SAFETY: the CPU has AVX-512F (checked above).
            let got = lanes(unsafe { load(&x, i, k, -1.0) });
            for (lane, g) in got.iter().enumerate() {
                let want = if lane < want_lanes { (i + lane) as f32 } else { -1.0 };
                assert_eq!(*g, want, "load at {i} mask {k:#x} lane {lane}");
            }
        }
    }

    #[test]
    fn row_max_skips_nan_and_handles_tails() {
        if !available() {
            return;
        }
        for n in [1, 15, 16, 17, 100] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37) % 23) as f32 - 40.0).collect();
            x[n / 2] = f32::NAN;
            // SAFETY: the CPU has AVX-512F (checked above).
            let got = unsafe { row_max(&x) };
            assert_eq!(got.to_bits(), generic_max(&x).to_bits(), "n = {n}");
        }
    }

    #[test]
    fn stream_out_writes_every_element_at_any_alignment() {
        if !available() {
            return;
        }
        let mut buf = vec![0f32; 200];
        for start in 0..17 {
            for n in [0, 1, 5, 16, 33, 150] {
                buf.iter_mut().for_each(|x| *x = -1.0);
                // SAFETY: the CPU has AVX-512F (checked above).
                unsafe {
                    stream_out(&mut buf[start..start + n], |i, _| {
                        _mm512_add_ps(
                            _mm512_set1_ps(i as f32),
                            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.),
                        )
                    })
                };
                for (j, x) in buf.iter().enumerate() {
                    let want = if (start..start + n).contains(&j) {
                        (j - start) as f32
                    } else {
                        -1.0
                    };
                    assert_eq!(*x, want, "start {start} n {n} at {j}");
                }
            }
        }
    }
}
