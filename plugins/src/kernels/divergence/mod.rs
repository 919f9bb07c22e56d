//! Fused per-token divergences between tempered student and teacher distributions, with their
//! gradient w.r.t. the student logits: forward KL, reverse KL, generalized JSD, forward and
//! reverse skew KL, and the total variation distance.
//!
//! With `a = z_s / T`, `b = z_t / T`, `ls = log_softmax(a)`, `lt = log_softmax(b)`,
//! `p_s = e^ls`, `p_t = e^lt`, per row (token):
//!
//! - forward: `D = sum_v p_t (lt - ls)`, `dD/da_u = p_s,u - p_t,u`;
//! - reverse: `D = sum_v p_s (ls - lt)`, `dD/da_u = p_s,u (ls_u - lt_u - D)`;
//! - jsd(beta), `m = beta p_t + (1 - beta) p_s`:
//!   `D = beta KL(p_t || m) + (1 - beta) KL(p_s || m)`,
//!   `dD/da_u = p_s,u (g_u - aux)` with `g_v = (1 - beta)(ls_v - ln m_v)`, `aux = sum_v p_s,v g_v`;
//! - skew forward(alpha), `m = alpha p_t + (1 - alpha) p_s`: `D = KL(p_t || m)`,
//!   `dD/da_u = -(1 - alpha) p_s,u (r_u - aux)` with `r_v = p_t,v / m_v`, `aux = sum_v p_s,v r_v`;
//! - skew reverse(alpha), `m = alpha p_s + (1 - alpha) p_t`: `D = KL(p_s || m)`,
//!   `dD/da_u = p_s,u (k_u - aux)` with `k_v = dD/dp_s,v = ls_v - ln m_v + (1 - alpha) p_t,v / m_v`,
//!   `aux = sum_v p_s,v k_v`;
//! - tvd: `D = 0.5 sum_v |p_t,v - p_s,v|`, `dD/da_u = 0.5 p_s,u (sigma_u - aux)` with
//!   `sigma_v = -1` where `p_t,v >= p_s,v`, else `+1` (the derivative of `|p_t - p_s|` w.r.t.
//!   `p_s` with candle's `sign(0) = +1`), `aux = sum_v p_s,v sigma_v`;
//!
//! and `dD/dz_s = dD/da / T`. The teacher gets no gradient. Terms with `p = 0` (a `-inf`
//! logit) count as 0, their limit.
//!
//! Forward: per row, one pass for both maxima and one for the `exp` sums, plus one for the
//! kinds with an `aux` (JSD, skew KL, TVD), which need both log-normalisers first; the output
//! is `[.., 4]` = `(D, lse_a, lse_b, aux)` (`aux = 0` for forward and reverse KL) so that the
//! backward pass is a single sweep that writes `grad_D * dD/dz_s`. Sums are accumulated in
//! f64; rows run in parallel. Nothing `[rows, vocab]`-sized is kept between forward and
//! backward. On AVX-512 CPUs the f32 rows of forward KL, reverse KL and JSD run in intrinsics
//! (`cpu_avx512.rs`); skew KL and TVD run the generic rows (`cpu.rs`) on every CPU.

pub mod composite;
mod cpu;
#[cfg(target_arch = "x86_64")]
mod cpu_avx512;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
mod terms;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{leaf_grads, Support};

/// Which divergence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p_t || p_s)`.
    Forward,
    /// `KL(p_s || p_t)`.
    Reverse,
    /// Generalized JSD with `0 < beta < 1` (use `Forward`/`Reverse` at the ends).
    Jsd(f64),
    /// Skew KL `KL(p_t || alpha p_t + (1 - alpha) p_s)` with `alpha` in `[0, 1)` (`Forward` at
    /// `alpha <= 0`; the fused op refuses `alpha >= 1`).
    SkewForward(f64),
    /// Skew KL `KL(p_s || alpha p_s + (1 - alpha) p_t)` with `alpha` in `[0, 1)` (`Reverse` at
    /// `alpha <= 0`; the fused op refuses `alpha >= 1`).
    SkewReverse(f64),
    /// Total variation distance `0.5 sum_v |p_t,v - p_s,v|`.
    Tvd,
}

impl Divergence {
    /// The kind the fused op computes: JSD's ends and skew KL at `alpha <= 0` become forward
    /// or reverse KL; an error for a skew `alpha >= 1` (or NaN).
    fn canonical(self) -> Result<Self> {
        Ok(match self {
            Divergence::Jsd(b) if b <= 0.0 => Divergence::Forward,
            Divergence::Jsd(b) if b >= 1.0 => Divergence::Reverse,
            Divergence::SkewForward(a) | Divergence::SkewReverse(a) if a >= 1.0 || a.is_nan() => {
                bail!("skew KL alpha {a} is not in [0, 1)")
            }
            Divergence::SkewForward(a) if a <= 0.0 => Divergence::Forward,
            Divergence::SkewReverse(a) if a <= 0.0 => Divergence::Reverse,
            k => k,
        })
    }
}

impl Divergence {
    /// The CUDA kernels' `kind` code and parameter (beta or alpha) of a canonical kind.
    #[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
    pub(crate) fn kernel_code(self) -> (i32, f64) {
        match self {
            Divergence::Forward => (0, 0.0),
            Divergence::Reverse => (1, 0.0),
            Divergence::Jsd(beta) => (2, beta),
            Divergence::SkewForward(alpha) => (3, alpha),
            Divergence::SkewReverse(alpha) => (4, alpha),
            Divergence::Tvd => (5, 0.0),
        }
    }
}

/// Columns of the forward's output: `(D, lse_a, lse_b, aux)` per row.
const COLS: usize = 4;

/// Where the fused divergences run.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused divergences run on `student` logits against `teacher` logits on the same
/// device (the teacher is cast to the student's dtype, so its own dtype does not matter).
pub fn supports(student: &Tensor, teacher: &Tensor) -> bool {
    SUPPORT.admits(student) && teacher.device().same_device(student.device())
}

/// Per-token divergence `[..]` of student logits `[.., V]` from teacher logits `[.., V]` at
/// temperature `t`, differentiable w.r.t. the student: the fused op where [`supports`], else
/// [`composite::per_token`].
pub fn per_token(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<Tensor> {
    if supports(student, teacher) {
        return fused(student, teacher, t, kind);
    }
    composite::per_token(student, teacher, t, kind)
}

/// The fused per-token divergence.
fn fused(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<Tensor> {
    let (zs, zt, op) = prepare(student, teacher, t, kind)?;
    let out = zs.apply_op2(&zt, op)?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

/// The fused [`per_token`] and its weighted gradient without autograd:
/// `(D [..], sum_r w_r dD_r/dz_s)` for per-token weights `w` `[..]` — the two fused sweeps
/// alone, for callers that drive their own backward, and to measure the kernels apart from
/// candle's gradient bookkeeping. Only where [`supports`].
pub fn per_token_and_grad(
    student: &Tensor,
    teacher: &Tensor,
    t: f64,
    kind: Divergence,
    weights: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (zs, zt, op) = prepare(student, teacher, t, kind)?;
    let res = zs.apply_op2_no_bwd(&zt, &op)?;
    let grad = op.student_grad(&zs, &zt, &res, &weights.unsqueeze(D::Minus1)?)?;
    Ok((res.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?, grad))
}

/// An error unless student and teacher logits have one shape.
fn check_shapes(student: &Tensor, teacher: &Tensor) -> Result<()> {
    if student.dims() != teacher.dims() {
        bail!(
            "student logits {:?} and teacher logits {:?} differ in shape",
            student.dims(),
            teacher.dims()
        )
    }
    Ok(())
}

/// Both logit tensors contiguous in the student's dtype, and the forward op.
fn prepare(student: &Tensor, teacher: &Tensor, t: f64, kind: Divergence) -> Result<(Tensor, Tensor, DivergenceFwd)> {
    check_shapes(student, teacher)?;
    let kind = kind.canonical()?;
    let zs = student.contiguous()?;
    let zt = teacher.detach().to_dtype(zs.dtype())?.contiguous()?;
    Ok((zs, zt, DivergenceFwd { kind, inv_t: 1.0 / t }))
}

/// The forward: `(D, lse_a, lse_b, aux)` per row.
struct DivergenceFwd {
    kind: Divergence,
    inv_t: f64,
}

/// The backward: `g dD/dz_s` from the logits and the forward's row statistics.
struct DivergenceBwd {
    kind: Divergence,
    inv_t: f64,
}

impl DivergenceFwd {
    /// `g_r * dD_r/dz_s` from the forward's row statistics `res` `[.., 4]` and `g` `[.., 1]`.
    fn student_grad(&self, zs: &Tensor, zt: &Tensor, res: &Tensor, g: &Tensor) -> Result<Tensor> {
        let aux = Tensor::cat(&[&res.detach(), &g.to_dtype(res.dtype())?], D::Minus1)?.contiguous()?;
        let op = DivergenceBwd {
            kind: self.kind,
            inv_t: self.inv_t,
        };
        zs.detach().apply_op3_no_bwd(&zt.detach(), &aux, &op)
    }
}

impl CustomOp2 for DivergenceFwd {
    fn name(&self) -> &'static str {
        "fused-divergence"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::fwd(self, s1, l1, s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::fwd(self, s1, l1, s2, l2)
    }

    fn bwd(&self, zs: &Tensor, zt: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only column 0 (D) of the output is ever read downstream; its gradient is all that
        // matters (the other columns get zeros from `narrow`'s backward).
        let g = grad.narrow(D::Minus1, 0, 1)?;
        Ok((leaf_grads::hand_over(zs, self.student_grad(zs, zt, res, &g)?)?, None))
    }
}

impl CustomOp3 for DivergenceBwd {
    fn name(&self) -> &'static str {
        "fused-divergence-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu::bwd(self, [(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(self, [(s1, l1), (s2, l2), (s3, l3)])
    }
}
