//! How a result is compared with its f64 reference: the error measures and the tolerance of
//! each dtype.
//!
//! For an output `x` and its reference `r` (both read as f64), over the elements where both are
//! finite: `abs = max |x - r|` and the normwise relative error `rel = abs / max |r|`. An
//! element where `x` is not finite and `r` is counts as a failure of its own (`non_finite`);
//! elements where the reference itself is not finite are not compared.

use candle_core::{bail, DType, Result, Tensor};
use serde::Serialize;

/// The error of one output (a value or a gradient) against its reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErrorStat {
    /// `max |x - r|` where both are finite.
    pub abs: f64,
    /// `max |x - r| / max |r|` (0 where both are 0; infinite where only the reference is 0).
    pub rel: f64,
    /// `max |r|` over the finite reference.
    pub ref_max: f64,
    /// Elements where the result is not finite and the reference is.
    pub non_finite: usize,
}

impl ErrorStat {
    /// The stat of `abs`, `ref_max` and `non_finite` (`rel` derived).
    pub fn new(abs: f64, ref_max: f64, non_finite: usize) -> Self {
        let rel = if abs == 0.0 { 0.0 } else { abs / ref_max };
        Self {
            abs,
            rel,
            ref_max,
            non_finite,
        }
    }

    /// The stat over the union of the elements of `self` and `other` (rows compared in chunks).
    pub fn merge(self, other: Self) -> Self {
        Self::new(
            self.abs.max(other.abs),
            self.ref_max.max(other.ref_max),
            self.non_finite + other.non_finite,
        )
    }

    /// Whether every element is finite where the reference is and `rel <= tolerance`.
    pub fn within(&self, tolerance: f64) -> bool {
        self.non_finite == 0 && self.rel <= tolerance
    }
}

/// The normwise relative tolerance of a fused op computing in `dtype`, `None` for dtypes
/// without one (integers, 8-bit floats).
pub fn tolerance(dtype: DType) -> Option<f64> {
    match dtype {
        DType::F64 => Some(1e-10),
        DType::F32 => Some(1e-5),
        DType::BF16 => Some(1e-2),
        DType::F16 => Some(2e-3),
        _ => None,
    }
}

/// The error of `x` against `reference` (same element count, any float dtypes and one device).
pub fn measure(x: &Tensor, reference: &Tensor) -> Result<ErrorStat> {
    let x = x.to_dtype(DType::F64)?.flatten_all()?;
    let r = reference.to_dtype(DType::F64)?.flatten_all()?;
    if x.dims() != r.dims() {
        bail!("result {:?} and reference {:?} differ in size", x.dims(), r.dims())
    }
    if x.elem_count() == 0 {
        return Ok(ErrorStat::new(0.0, 0.0, 0));
    }
    // `|t| <= f64::MAX` is false for NaN and both infinities.
    let (fx, fr) = (x.abs()?.le(f64::MAX)?, r.abs()?.le(f64::MAX)?);
    let both = (&fx * &fr)?;
    let zeros = r.zeros_like()?;
    let diff = both.where_cond(&(&x - &r)?.abs()?, &zeros)?;
    let ref_abs = fr.where_cond(&r.abs()?, &zeros)?;
    let count = |m: &Tensor| -> Result<f64> { m.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>() };
    let non_finite = count(&fr)? - count(&both)?;
    Ok(ErrorStat::new(
        diff.max_all()?.to_scalar::<f64>()?,
        ref_abs.max_all()?.to_scalar::<f64>()?,
        non_finite as usize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(x: &[f64]) -> Tensor {
        Tensor::new(x, &Device::Cpu).expect("tensor")
    }

    fn reference() -> Tensor {
        t(&[0.5, -2.0, 1.0, 0.0])
    }

    #[test]
    fn an_exact_result_has_no_error() {
        let e = measure(&reference(), &reference()).expect("measure");
        assert_eq!(e, ErrorStat::new(0.0, 2.0, 0));
        assert!(e.within(0.0));
    }

    #[test]
    fn a_perturbed_result_fails_the_f32_tolerance() {
        let x = t(&[0.5, -2.0 + 1e-4, 1.0, 0.0]);
        let e = measure(&x, &reference()).expect("measure");
        assert!((e.abs - 1e-4).abs() < 1e-12, "{e:?}");
        assert!((e.rel - 5e-5).abs() < 1e-12, "{e:?}");
        assert!(!e.within(tolerance(DType::F32).expect("f32")));
        assert!(e.within(tolerance(DType::BF16).expect("bf16")));
    }

    #[test]
    fn a_result_rounded_to_f32_passes_the_f32_tolerance() {
        let r = t(&[0.1, -2.3, 1.7, 1e-3]);
        let x = r.to_dtype(DType::F32).expect("f32");
        let e = measure(&x, &r).expect("measure");
        assert!(e.abs > 0.0 && e.within(1e-7), "{e:?}");
    }

    #[test]
    fn non_finite_results_fail_where_the_reference_is_finite() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let x = t(&[0.5, bad, 1.0, 0.0]);
            let e = measure(&x, &reference()).expect("measure");
            assert_eq!(e.non_finite, 1, "{bad}: {e:?}");
            assert_eq!(e.abs, 0.0, "{bad}: the bad element is counted, not measured");
            assert!(!e.within(f64::INFINITY), "{bad}");
        }
    }

    #[test]
    fn non_finite_reference_elements_are_not_compared() {
        let r = t(&[f64::NEG_INFINITY, 1.0]);
        let e = measure(&t(&[f64::NEG_INFINITY, 1.0]), &r).expect("measure");
        assert_eq!(e, ErrorStat::new(0.0, 1.0, 0));
    }

    #[test]
    fn a_zero_reference_with_a_nonzero_result_fails() {
        let e = measure(&t(&[1e-30]), &t(&[0.0])).expect("measure");
        assert!(e.rel.is_infinite() && !e.within(1.0), "{e:?}");
    }

    #[test]
    fn merged_chunks_measure_as_the_whole() {
        let x = t(&[0.5, -2.1, 1.0, 3.0]);
        let r = t(&[0.5, -2.0, 1.2, 3.0]);
        let whole = measure(&x, &r).expect("whole");
        let a = measure(&x.narrow(0, 0, 2).expect("a"), &r.narrow(0, 0, 2).expect("a")).expect("a");
        let b = measure(&x.narrow(0, 2, 2).expect("b"), &r.narrow(0, 2, 2).expect("b")).expect("b");
        assert_eq!(a.merge(b), whole);
    }

    #[test]
    fn sizes_must_agree() {
        assert!(measure(&t(&[1.0]), &reference()).is_err());
    }

    #[test]
    fn every_float_dtype_under_test_has_a_tolerance() {
        for d in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            assert!(tolerance(d).is_some_and(|t| t > 0.0 && t < 0.1), "{d:?}");
        }
        assert_eq!(tolerance(DType::U32), None);
    }
}
