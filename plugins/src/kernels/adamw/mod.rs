//! Fused AdamW update (Loshchilov & Hutter, 2019): one pass over a parameter, its gradient and
//! both moments instead of a dozen candle ops (each a full pass and a fresh tensor).
//!
//! With `g' = s g` (`s` the clipping scale):
//! `m' = b1 m + (1 - b1) g'`, `v' = b2 v + (1 - b2) g'^2`,
//! `w' = w (1 - lr wd) - lr (m' / bc1) / (sqrt(v' / bc2) + eps)`, where `bc1 = 1 - b1^t` and
//! `bc2 = 1 - b2^t`: the formula of [`composite::update`] (the composed update), in the same element type (the two agree to rounding: candle divides by a scalar
//! as a multiply by its reciprocal).
//!
//! Not a graph node (an optimizer step is not differentiated): [`adamw_step`] picks the
//! implementation by the parameter's device. On the CPU the fused pass writes new tensors; on
//! a GPU one kernel (`adamw.cu`, `cuda.rs`) updates the parameter and both moments in place.

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod tests;

use candle_core::{bail, DType, Result, Tensor, Var};

use super::Support;

/// The scalars of one AdamW step for one parameter.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// `beta1`.
    pub beta1: f64,
    /// `beta2`.
    pub beta2: f64,
    /// `1 - beta1^t`.
    pub bias_correction1: f64,
    /// `1 - beta2^t`.
    pub bias_correction2: f64,
    /// `epsilon`.
    pub eps: f64,
    /// The parameter's learning rate (group factor applied).
    pub lr: f64,
    /// The parameter's decoupled weight decay.
    pub weight_decay: f64,
    /// Gradient scale from global-norm clipping (1 = none).
    pub grad_scale: f64,
}

/// Where the fused update runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: CUDA_DTYPES,
};

#[cfg(feature = "cuda")]
const CUDA_DTYPES: &[DType] = &[DType::F32, DType::F64];
#[cfg(not(feature = "cuda"))]
const CUDA_DTYPES: &[DType] = &[];

/// Whether the fused update runs on these tensors: one supported device and dtype, contiguous,
/// of one element count.
pub fn supports(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [w, g, m, v];
    SUPPORT.admits_together(w, &[g, m, v])
        && all.iter().all(|t| t.is_contiguous())
        && all.iter().all(|t| t.elem_count() == w.elem_count())
}

/// `(w', m', v')` of one AdamW step (see the module doc), each shaped like `w`: the fused pass
/// where [`supports`], else [`composite::update`].
pub fn adamw_update(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    if supports(w, g, m, v) {
        return fused(w, g, m, v, s);
    }
    composite::update(w, g, m, v, s)
}

/// One AdamW step of parameter `w` with gradient `g` and moments `m`, `v` (see the module
/// doc): on a GPU where [`supports`], one in-place kernel over `w`, `m` and `v` (the moments
/// must be tensors of their own, sharing no storage); elsewhere [`adamw_update`]'s new tensors
/// replace them (`w` by [`Var::set`]).
pub fn adamw_step(w: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: AdamWStep) -> Result<()> {
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() && supports(w, g, m, v) {
        return cuda::update_in_place(w, g, m, v, s);
    }
    let (w2, m2, v2) = adamw_update(w.as_tensor(), g, m, v, s)?;
    w.set(&w2)?;
    (*m, *v) = (m2, v2);
    Ok(())
}

/// The fused pass; an error off the [`SUPPORT`] table.
fn fused(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    if !supports(w, g, m, v) || !w.device().is_cpu() {
        bail!("fused adamw: expected contiguous CPU f32/f64 tensors of one size and dtype")
    }
    cpu::update(w, g, m, v, s)
}
