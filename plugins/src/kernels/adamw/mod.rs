//! Fused AdamW update (Loshchilov & Hutter, 2019): one pass over a parameter, its gradient and
//! both moments instead of a dozen candle ops (each a full pass and a fresh tensor).
//!
//! With `g' = s g` (`s` the clipping scale):
//! `m' = b1 m + (1 - b1) g'`, `v' = b2 v + (1 - b2) g'^2`,
//! `w' = w (1 - lr wd) - lr (m' / bc1) / (sqrt(v' / bc2) + eps)`, where `bc1 = 1 - b1^t` and
//! `bc2 = 1 - b2^t`: the formula of [`composite::update`] (the composed update), in the same element type (the two agree to rounding: candle divides by a scalar
//! as a multiply by its reciprocal).
//!
//! Not a graph node (an optimizer step is not differentiated): [`adamw_step`] and
//! [`adamw_group_step`] pick the implementation by the parameters' device. On the CPU the fused
//! pass writes new tensors; on a GPU one kernel launch (`adamw.cu`, `cuda.rs`) updates every
//! parameter of a group and both its moments in place. [`sum_squares`] is the reduction of the
//! global-norm clipping that comes before the step: one launch for all the gradients on a GPU.

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
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

/// Where [`sum_squares`] runs fused.
pub const SUM_SQUARES_SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
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
/// doc): where [`supports`], in place over `w`, `m` and `v` (one kernel on a GPU, one pass on the
/// CPU; the moments must be tensors of their own, sharing no storage with each other, `w` or
/// `g`); elsewhere [`adamw_update`]'s new tensors replace them (`w` by [`Var::set`]).
pub fn adamw_step(w: &Var, g: &Tensor, m: &mut Tensor, v: &mut Tensor, s: AdamWStep) -> Result<()> {
    adamw_group_step(&mut [AdamWSlot { w, g, m, v }], s)
}

/// One parameter of a group step: the parameter, its gradient and its two moments.
pub struct AdamWSlot<'a> {
    /// The parameter.
    pub w: &'a Var,
    /// Its gradient.
    pub g: &'a Tensor,
    /// Its first moment.
    pub m: &'a mut Tensor,
    /// Its second moment.
    pub v: &'a mut Tensor,
}

/// One AdamW step of a group of parameters that share the step's scalars (one learning rate,
/// one decay): on a GPU, where every slot [`supports`] in one dtype, one kernel launch updates
/// them all in place (the moments must be tensors of their own); on the CPU each slot that
/// [`supports`] is updated in place by one pass; elsewhere [`adamw_update`]'s new tensors.
pub fn adamw_group_step(slots: &mut [AdamWSlot<'_>], s: AdamWStep) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(first) = slots.first() {
        let on_gpu = |x: &AdamWSlot<'_>| {
            x.w.device().is_cuda() && x.w.dtype() == first.w.dtype() && supports(x.w, x.g, x.m, x.v)
        };
        if slots.iter().all(on_gpu) {
            let group: Vec<[&Tensor; 4]> = slots.iter().map(|x| [x.w.as_tensor(), x.g, &*x.m, &*x.v]).collect();
            return cuda::update_group(&group, s);
        }
    }
    for x in slots.iter_mut() {
        if x.w.device().is_cpu() && supports(x.w, x.g, x.m, x.v) {
            cpu::update_in_place(x.w.as_tensor(), x.g, x.m, x.v, s)?;
            continue;
        }
        let (w, m, v) = adamw_update(x.w.as_tensor(), x.g, x.m, x.v, s)?;
        x.w.set(&w)?;
        (*x.m, *x.v) = (m, v);
    }
    Ok(())
}

/// `sum(x^2)` of each of `xs` in f64, on the host: the squared norms of the gradient-norm
/// clipping. Fused where [`sum_squares_supports`]: on the CPU one pass per tensor, on a GPU one
/// kernel launch for all and one transfer (`adamw.cu`); elsewhere [`composite::sum_squares`].
pub fn sum_squares(xs: &[Tensor]) -> Result<Vec<f64>> {
    if !sum_squares_supports(xs) {
        return composite::sum_squares(xs);
    }
    #[cfg(feature = "cuda")]
    if xs.first().is_some_and(|x| x.device().is_cuda()) {
        return cuda::sum_squares(&xs.iter().collect::<Vec<_>>());
    }
    cpu::sum_squares(xs)
}

/// Whether [`sum_squares`] runs fused on `xs`: contiguous tensors of one dtype and device of
/// [`SUM_SQUARES_SUPPORT`].
pub fn sum_squares_supports(xs: &[Tensor]) -> bool {
    xs.split_first().is_some_and(|(first, rest)| {
        SUM_SQUARES_SUPPORT.admits_together(first, &rest.iter().collect::<Vec<_>>())
            && xs.iter().all(Tensor::is_contiguous)
    })
}

/// The fused pass: new tensors (on a GPU, the in-place kernel on copies); an error off the
/// [`SUPPORT`] table.
fn fused(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<(Tensor, Tensor, Tensor)> {
    if !supports(w, g, m, v) {
        bail!("fused adamw: expected contiguous f32/f64 tensors of one size, dtype and device")
    }
    #[cfg(feature = "cuda")]
    if w.device().is_cuda() {
        let (w, m, v) = (w.copy()?, m.copy()?, v.copy()?);
        cuda::update_group(&[[&w, g, &m, &v]], s)?;
        return Ok((w, m, v));
    }
    cpu::update(w, g, m, v, s)
}
