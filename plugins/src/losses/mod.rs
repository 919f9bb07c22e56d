//! Built-in loss terms. Weight convention: `total = sum_i weight_i * term_i` (see
//! `retort_core::loss`); logit KD terms include their own `T^2` factor.

pub mod attention;
pub mod ce;
pub mod contrastive;
pub mod hidden;
pub mod jsd;
pub mod kl;
pub mod layerwise;
pub mod logit;
pub mod reverse_kl;
pub mod skew_kl;
pub mod topk_kl;
pub mod tvd;

use candle_core::{DType, Tensor};
use retort_core::{Error, Result};

/// Mean of per-token values `[batch, seq]` over the tokens that count (mask 1), as a scalar.
pub fn masked_mean(per_token: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        None => per_token.mean_all()?,
        Some(m) => {
            let m = m.to_dtype(per_token.dtype())?;
            let count = m.sum_all()?;
            let total = (per_token * &m)?.sum_all()?;
            // Guard against an all-padding batch: the term is 0, not NaN.
            let count = count.maximum(1.0)?;
            total.div(&count)?
        }
    })
}

/// Checks that student and teacher logits agree in shape (same vocabulary, same windows).
pub fn check_same_shape(student: &Tensor, teacher: &Tensor) -> Result<()> {
    if student.dims() != teacher.dims() {
        return Err(Error::Incompatible(format!(
            "student logits {:?} and teacher logits {:?} differ in shape (vocabulary mismatch?)",
            student.dims(),
            teacher.dims()
        )));
    }
    Ok(())
}

/// Logits cast to f32 at least (bf16/f16 teachers are compared in f32).
pub fn as_float(t: &Tensor) -> Result<Tensor> {
    Ok(match t.dtype() {
        DType::F32 | DType::F64 => t.clone(),
        _ => t.to_dtype(DType::F32)?,
    })
}
