//! The f32 GELU in AVX-512 intrinsics, as the logistic form of the same function:
//! `1 + tanh u = 2 s` with `s = 1 / (1 + e^{-2u})`, so `y = x s` and
//! `dy/dx = s + 2 c x s (1 - s)(1 + 3a x^2)` — one FMA `exp` and one reciprocal estimate with a
//! Newton step per vector, where the generic loop pays an uncontracted `exp` and a `vdivps`.

use std::arch::x86_64::*;

use super::{A, C};
use crate::kernels::cpu::raw::avx512::{exp_ps, map1, map2, recip_ps};

/// `(s, x^2)` for 16 lanes of `x`.
#[inline]
#[target_feature(enable = "avx512f,fma")]
fn logistic(x: __m512) -> (__m512, __m512) {
    let x2 = _mm512_mul_ps(x, x);
    // -2u = -2c x (1 + a x^2)
    let inner = _mm512_fmadd_ps(x2, _mm512_set1_ps(A as f32), _mm512_set1_ps(1.0));
    let m2u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(-2.0 * C as f32)), inner);
    let s = recip_ps(_mm512_add_ps(_mm512_set1_ps(1.0), exp_ps(m2u)));
    (s, x2)
}

/// `o = gelu(x)`.
#[target_feature(enable = "avx512f,fma")]
pub(super) fn fwd(o: &mut [f32], x: &[f32]) {
    map1(o, x, |x| _mm512_mul_ps(x, logistic(x).0));
}

/// `o = g * gelu'(x)`.
#[target_feature(enable = "avx512f,fma")]
pub(super) fn bwd(o: &mut [f32], x: &[f32], g: &[f32]) {
    map2(o, x, g, |x, g| {
        let (s, x2) = logistic(x);
        let slope = _mm512_fmadd_ps(x2, _mm512_set1_ps(3.0 * A as f32), _mm512_set1_ps(1.0));
        let t = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(2.0 * C as f32)), slope);
        let ss = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_set1_ps(1.0), s));
        _mm512_mul_ps(g, _mm512_fmadd_ps(t, ss, s))
    });
}
