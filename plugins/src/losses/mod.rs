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
pub mod sampled_reverse_kl;
pub mod skew_kl;
pub mod topk_kl;
pub mod tvd;

use candle_core::{DType, Tensor};
use retort_core::{Error, Result};

/// Mean of per-token values `[batch, seq]` over the tokens that count, for terms that weight by
/// the padding mask only; terms that also take the router's token weights reduce with
/// [`retort_core::StepContext::token_mean`].
pub use retort_core::ops::masked_mean;

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
