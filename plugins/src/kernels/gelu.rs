//! Fused GELU, tanh approximation (GPT-2's `gelu_new`; Hendrycks & Gimpel, 2016), with backward.
//!
//! `y = 0.5 x (1 + tanh u)`, `u = c (x + 0.044715 x^3)`, `c = sqrt(2 / pi)`;
//! `dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) c (1 + 3 * 0.044715 x^2)`.
//!
//! One vectorised pass (the `tanh` of [`super::fastmath`]) instead of candle's libm `tanh`,
//! chunks spread over the rayon pool. The backward recomputes `tanh u` from the input.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath::Real;
use super::rows::{as_f32, as_f32_mut, by_dtype, output_vec, slice};

const C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const A: f64 = 0.044_715;
const CHUNK: usize = 16_384;

/// GELU (tanh approximation) of `x` (f32/f64 on the CPU, see [`super::fusable`]).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluFwd)
}

struct GeluFwd;
struct GeluBwd;

#[inline(always)]
fn fwd<T: Real>(x: T) -> T {
    let (c, a, h) = (T::from_f64(C), T::from_f64(A), T::from_f64(0.5));
    let u = c * (x + a * x * x * x);
    h * x * (T::ONE + u.tanh())
}

#[inline(always)]
fn grad<T: Real>(x: T) -> T {
    let (c, a, h) = (T::from_f64(C), T::from_f64(A), T::from_f64(0.5));
    let x2 = x * x;
    let th = (c * (x + a * x2 * x)).tanh();
    h * (T::ONE + th) + h * x * (T::ONE - th * th) * c * (T::ONE + T::from_f64(3.0) * a * x2)
}

#[inline(always)]
fn fwd_chunk<T: Real>(o: &mut [T], x: &[T]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = fwd(x);
    }
}

#[inline(always)]
fn bwd_chunk<T: Real>(o: &mut [T], x: &[T], g: &[T]) {
    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
        *o = g * grad(x);
    }
}

avx512_dispatch!(fwd_chunk_generic, fwd_chunk_avx512, fwd_chunk, (o: &mut [T], x: &[T]));
avx512_dispatch!(bwd_chunk_generic, bwd_chunk_avx512, bwd_chunk, (o: &mut [T], x: &[T], g: &[T]));

/// f32 with AVX-512 intrinsics, as the logistic form of the same function:
/// `1 + tanh u = 2 s` with `s = 1 / (1 + e^{-2u})`, so `y = x s` and
/// `dy/dx = s + 2 c x s (1 - s)(1 + 3a x^2)` — one FMA `exp` and one reciprocal estimate with a
/// Newton step per vector, where the generic loop pays an uncontracted `exp` and a `vdivps`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{A, C};
    use crate::kernels::avx512::{exp_ps, map1, map2, recip_ps};

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

    #[target_feature(enable = "avx512f,fma")]
    pub fn fwd(o: &mut [f32], x: &[f32]) {
        map1(o, x, |x| _mm512_mul_ps(x, logistic(x).0));
    }

    #[target_feature(enable = "avx512f,fma")]
    pub fn bwd(o: &mut [f32], x: &[f32], g: &[f32]) {
        map2(o, x, g, |x, g| {
            let (s, x2) = logistic(x);
            let slope = _mm512_fmadd_ps(x2, _mm512_set1_ps(3.0 * A as f32), _mm512_set1_ps(1.0));
            let t = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(2.0 * C as f32)), slope);
            let ss = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_set1_ps(1.0), s));
            _mm512_mul_ps(g, _mm512_fmadd_ps(t, ss, s))
        });
    }
}

fn fwd_chunk_any<T: Real>(o: &mut [T], x: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx512::available() {
        if let (Some(o), Some(x)) = (as_f32_mut(o), as_f32(x)) {
            // SAFETY: the CPU has AVX-512F and FMA (checked above).
            #[allow(unsafe_code)]
            unsafe {
                avx512::fwd(o, x)
            };
            return;
        }
    }
    fwd_chunk_generic(o, x)
}

fn bwd_chunk_any<T: Real>(o: &mut [T], x: &[T], g: &[T]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::avx512::available() {
        if let (Some(o), Some(x), Some(g)) = (as_f32_mut(o), as_f32(x), as_f32(g)) {
            // SAFETY: the CPU has AVX-512F and FMA (checked above).
            #[allow(unsafe_code)]
            unsafe {
                avx512::bwd(o, x, g)
            };
            return;
        }
    }
    bwd_chunk_generic(o, x, g)
}

pub(crate) fn fwd_typed<T: Real>(x: &[T]) -> Vec<T> {
    let mut out = output_vec(x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| fwd_chunk_any(o, x));
    out
}

impl CustomOp1 for GeluFwd {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype(
            "fused-gelu",
            &[s],
            || Ok(f32::storage(fwd_typed(slice::<f32>(s, l, "gelu input")?))),
            || Ok(f64::storage(fwd_typed(slice::<f64>(s, l, "gelu input")?))),
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.detach().apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)?))
    }
}

pub(crate) fn bwd_typed<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    let mut out = output_vec(x.len());
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(o, (x, g))| bwd_chunk_any(o, x, g));
    out
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype(
            "fused-gelu-grad",
            &[s1, s2],
            || {
                Ok(f32::storage(bwd_typed(
                    slice::<f32>(s1, l1, "x")?,
                    slice::<f32>(s2, l2, "grad")?,
                )))
            },
            || {
                Ok(f64::storage(bwd_typed(
                    slice::<f64>(s1, l1, "x")?,
                    slice::<f64>(s2, l2, "grad")?,
                )))
            },
        )?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn matches_candle_gelu_values_and_gradients() {
        let xs: Vec<f64> = (0..40_001).map(|i| (i as f64 - 20_000.0) / 2_000.0).collect();
        let x0 = Tensor::from_vec(xs, 40_001, &Device::Cpu).expect("x");
        let w = x0.sin().expect("w");
        for dtype in [DType::F64, DType::F32] {
            let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("v");
            let w = w.to_dtype(dtype).expect("d");
            let run = |y: Tensor| -> (Vec<f64>, Vec<f64>) {
                let g = (&y * &w)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                let f = |t: &Tensor| -> Vec<f64> { t.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("v") };
                (f(&y), f(g.get(x.as_tensor()).expect("grad")))
            };
            let (fy, fg) = run(gelu(x.as_tensor()).expect("fused"));
            let (cy, cg) = run(x.as_tensor().gelu().expect("candle"));
            // The exact derivative, by central differences of the fused forward (f64 only).
            if dtype == DType::F64 {
                for &i in &[0usize, 9_000, 19_999, 20_001, 23_456, 40_000] {
                    let at = |d: f64| -> f64 {
                        let v = x0.to_vec1::<f64>().expect("v")[i] + d;
                        gelu(&Tensor::new(&[v], &Device::Cpu).expect("t"))
                            .and_then(|y| y.to_vec1::<f64>())
                            .expect("y")[0]
                    };
                    let num = (at(1e-6) - at(-1e-6)) / 2e-6;
                    let ana = fg[i] / w.to_dtype(DType::F64).and_then(|w| w.to_vec1::<f64>()).expect("w")[i];
                    assert!((num - ana).abs() < 1e-7, "x[{i}]: numeric {num} vs analytic {ana}");
                }
            }
            // Relative to max(|value|, 1): GELU and its slope are O(1) at most.
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for i in 0..fy.len() {
                assert!(
                    (fy[i] - cy[i]).abs() <= tol * cy[i].abs().max(1.0),
                    "{dtype:?} y[{i}]: {} vs {}",
                    fy[i],
                    cy[i]
                );
                // candle's GELU backward uses 6-digit constants (0.398942, 0.0535161): 1e-5.
                assert!(
                    (fg[i] - cg[i]).abs() <= 1e-5 * cg[i].abs().max(1.0),
                    "{dtype:?} dy[{i}]: {} vs {}",
                    fg[i],
                    cg[i]
                );
            }
        }
    }
}
