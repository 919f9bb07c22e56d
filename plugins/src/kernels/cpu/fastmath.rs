//! Branch-free, auto-vectorisable `exp`, `ln` and `tanh` for `f32`, and the [`Real`] trait the
//! fused kernels are generic over (`f32` uses these approximations, `f64` uses libm).
//!
//! - `exp`: Cephes `expf`. `x = n ln2 + r`, `|r| <= ln2 / 2`, `e^r` by a degree-6 polynomial,
//!   `2^n` assembled in the exponent bits; rounding by the `1.5 * 2^23` trick so that no
//!   `round` call blocks vectorisation. Max relative error ~2e-7 on `[-87, 88]`; `exp(x) = 0`
//!   below `-87.3` (so `exp(-inf) = 0`), NaN in gives NaN out.
//! - `ln`: Cephes `logf`. `x = m 2^e`, `m in [sqrt(1/2), sqrt(2))`, `ln(1 + f)` by a degree-9
//!   polynomial. Max relative error ~2e-7 for normal `x > 0`; `ln(0) = -inf`.
//! - `tanh(x) = 1 - 2 / (exp(2x) + 1)`: absolute error ~2e-7 (relative ~1e-6 near 0, where
//!   it is only ever used multiplied by `x`).
//!
//! Every comparison is written as a select (`if c { a } else { b }` on plain values), which
//! LLVM turns into SIMD blends: the loops that call these functions vectorise with the
//! baseline x86-64 target (SSE2), and wider with `-C target-cpu=native`.

use std::ops::{Add, Div, Mul, Neg, Sub};

use candle_core::{CpuStorage, DType};

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `exp` returns 0 (the smallest normal is `exp(-87.34)`).
const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.3;
const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23

/// `e^x` for `f32`, ~2e-7 relative error; see the module docs.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // Selects, not f32::max/min: they would turn NaN into a bound.
    let xc = if x < EXP_LO { EXP_LO } else { x };
    let xc = if xc > EXP_HI { EXP_HI } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
    let out = y * scale;
    if x < EXP_LO {
        0.0
    } else {
        out
    }
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `ln x` for `f32 >= 0`, ~2e-7 relative error; `ln 0 = -inf`, negative or NaN gives NaN.
#[inline(always)]
pub fn ln_f32(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // [0.5, 1)
    let small = m < SQRT_HALF;
    let e = (if small { e - 1 } else { e }) as f32;
    let f = if small { m + m - 1.0 } else { m - 1.0 };
    let z = f * f;
    let p = 7.037_683_6e-2_f32;
    let p = p * f - 1.151_461e-1;
    let p = p * f + 1.167_699_9e-1;
    let p = p * f - 1.242_014_1e-1;
    let p = p * f + 1.424_932_3e-1;
    let p = p * f - 1.666_805_8e-1;
    let p = p * f + 2.000_071_4e-1;
    let p = p * f - 2.499_999_4e-1;
    let p = p * f + 0.333_333_34;
    let y = p * f * z + e * LN2_LO - 0.5 * z;
    let out = f + y + e * LN2_HI;
    if x == 0.0 {
        f32::NEG_INFINITY
    } else if x > 0.0 && x < f32::INFINITY {
        out
    } else if x == f32::INFINITY {
        x
    } else {
        f32::NAN
    }
}

/// `tanh x` for `f32` via [`exp_f32`]: `1 - 2 / (e^{2x} + 1)`.
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    // Clamp so e^{2x} stays finite; tanh(+-9) = +-1 to f32 precision.
    let xc = if x > 9.0 { 9.0 } else { x };
    let xc = if xc < -9.0 { -9.0 } else { xc };
    1.0 - 2.0 / (exp_f32(2.0 * xc) + 1.0)
}

/// The element types the fused kernels run on: `f32` (fast approximations above) and `f64`
/// (libm, for reference-precision runs and tests).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `-inf`.
    const NEG_INF: Self;
    /// The candle dtype.
    const DTYPE: DType;
    /// Widening to f64.
    fn to_f64(self) -> f64;
    /// Narrowing from f64.
    fn from_f64(x: f64) -> Self;
    /// `e^x`.
    fn exp(self) -> Self;
    /// `ln x`.
    fn ln(self) -> Self;
    /// `tanh x`.
    fn tanh(self) -> Self;
    /// `sqrt x`.
    fn sqrt(self) -> Self;
    /// The slice inside a storage of this dtype.
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    /// The mutable slice inside a storage of this dtype.
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
    /// A storage holding `v`.
    fn storage(v: Vec<Self>) -> CpuStorage;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        ln_f32(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        tanh_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(v)
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn slice(s: &CpuStorage) -> Option<&[Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(v)
    }
}

/// Lanes of the lane-wise reductions below: independent accumulators that LLVM maps onto SIMD
/// registers (a plain `sum += x` loop cannot vectorise without reassociation). 16 f32 lanes fill
/// one AVX-512 register (8 left the AVX-512 copies at 256-bit `ymm`; the `kl` forward at
/// N = 2048, V = 50,257 went 0.131 s -> 0.082 s).
pub const LANES: usize = 16;

/// `max_v x_v` (NaN entries are skipped here; they surface as NaN in the `exp` sums).
#[inline(always)]
pub fn row_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::NEG_INF; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = T::NEG_INF;
    for &v in acc.iter().chain(rest) {
        m = if v > m { v } else { m };
    }
    m
}

/// Elements per block of the lane-wise reductions: each lane sums `BLOCK / LANES` values in the
/// element type before the block total is added in f64 (so f32 rounding stays at ~1e-7).
pub const BLOCK: usize = 32 * LANES;

/// `sum_v f(x_v, y_v)` for `K` quantities at once, over two equally long rows: lane-wise in the
/// element type within blocks, f64 across blocks. `f` must be branch-free (selects only) for
/// the loop to vectorise.
#[inline(always)]
pub fn reduce2<T: Real, const K: usize>(x: &[T], y: &[T], f: impl Fn(T, T) -> [T; K]) -> [f64; K] {
    let mut total = [0f64; K];
    for (bx, by) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
        let mut acc = [[T::ZERO; LANES]; K];
        let (cx, cy) = (bx.chunks_exact(LANES), by.chunks_exact(LANES));
        let (rx, ry) = (cx.remainder(), cy.remainder());
        for (cx, cy) in cx.zip(cy) {
            for i in 0..LANES {
                let v = f(cx[i], cy[i]);
                for k in 0..K {
                    acc[k][i] = acc[k][i] + v[k];
                }
            }
        }
        for (&a, &b) in rx.iter().zip(ry) {
            let v = f(a, b);
            for k in 0..K {
                total[k] += v[k].to_f64();
            }
        }
        for k in 0..K {
            for lane in acc[k] {
                total[k] += lane.to_f64();
            }
        }
    }
    total
}

/// `sum_v e^{s x_v - shift}`, accumulated as in [`reduce2`].
#[inline(always)]
pub fn sum_exp<T: Real>(x: &[T], s: T, shift: T) -> f64 {
    reduce2(x, x, |v, _| [(v * s - shift).exp()])[0]
}

/// `sum_v x_v`, accumulated as in [`reduce2`].
#[inline(always)]
pub fn sum<T: Real>(x: &[T]) -> f64 {
    reduce2(x, x, |v, _| [v])[0]
}

/// `x <- e^(x - max x)` in place; returns the sum of the new values.
#[inline(always)]
pub fn exp_shifted_sum<T: Real>(x: &mut [T]) -> f64 {
    if let Some(x) = crate::kernels::cpu::raw::as_f32_mut(x) {
        return exp_shifted_sum_f32(x);
    }
    exp_shifted_sum_loop(x)
}

crate::kernels::cpu::raw::avx512_dispatch!(
    /// [`exp_shifted_sum`] for f32: `raw::avx512::exp_shifted_sum` where the CPU has AVX-512.
    fn exp_shifted_sum_f32(x: &mut [f32]) -> f64
        => crate::kernels::cpu::raw::avx512::exp_shifted_sum, else exp_shifted_sum_loop::<f32>
);

/// [`exp_shifted_sum`]'s generic loop.
#[inline(always)]
fn exp_shifted_sum_loop<T: Real>(x: &mut [T]) -> f64 {
    let m = row_max(x);
    for v in x.iter_mut() {
        *v = (*v - m).exp();
    }
    sum(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn ln_matches_libm_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            let want = (x as f64).ln();
            let got = ln_f32(x) as f64;
            // Relative where |ln x| is not tiny, absolute near x = 1.
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
            x *= 1.0137;
        }
        assert!(worst < 4e-7, "worst error {worst}");
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert!(ln_f32(-1.0).is_nan() && ln_f32(f32::NAN).is_nan());
        assert_eq!(ln_f32(1.0), 0.0);
    }

    #[test]
    fn tanh_is_accurate_in_absolute_terms() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            worst = worst.max((tanh_f32(x) as f64 - (x as f64).tanh()).abs());
            x += 0.00731;
        }
        assert!(worst < 5e-7, "worst absolute error {worst}");
    }

    #[test]
    fn reductions_match_plain_loops() {
        let x: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 / 17.0 - 3.0).collect();
        assert_eq!(row_max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = x.iter().map(|&v| (0.5 * v as f64 - 1.0).exp()).sum();
        assert!((sum_exp(&x, 0.5, 1.0) - want).abs() / want < 1e-6);
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) - want).abs() < 1e-6 * want.abs().max(1.0));
    }
}
