//! Fused per-token top-k KL (the `topk_kl` term's bucket and renormalize tails) with its
//! gradient w.r.t. the student logits.
//!
//! Inputs per row: student logits `z` `[V]`, teacher ids `S = (id_j)` and teacher log-probs
//! `lpt_j` (at temperature 1), `j < k`. An entry with `lpt_j = -inf` is skipped (that is how
//! the union with the student's top-k marks duplicates). `a = z / T`, `ls = log_softmax(a)`,
//! `p_s = e^ls`.
//!
//! - bucket (`T = 1`): `D = sum_j pt_j (lpt_j - ls_{id_j}) + m_t ln(m_t / m_s)`,
//!   `m_t = max(1 - P_t, eps)`, `m_s = max(1 - P_s, eps)`, `P_t = sum_j pt_j`,
//!   `P_s = sum_j p_s,id_j`. With `c = -m_t / m_s` (0 when `m_s` is clamped):
//!   `dD/da_u = p_s,u (P_t + c P_s) - sum_{j: id_j = u} (pt_j + c p_s,u)`.
//!   One full-row pass for the student's log-normaliser; the rest touches `k` entries.
//! - renormalize: `q_t = softmax_S(lpt / T)`, `q_s = softmax_S(a_S)`,
//!   `D = sum_j q_t,j (ln q_t,j - ln q_s,j)`, `dD/da_{id_j} += q_s,j - q_t,j`. Touches only
//!   the `k` entries (the student's full log-normaliser cancels).
//!
//! `dD/dz = dD/da / T`. Forward output `[.., 4]` = `(D, lse, c1, c2)`; the backward writes the
//! dense gradient row in one sweep (bucket) or zeros plus `k` entries (renormalize).

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::{leaf_grads, Support};

/// Tail treatment (the term's `tail`, less `uniform`, which has no fused form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkTail {
    /// The mass outside the top-k is one more outcome.
    Bucket,
    /// Both sides renormalised over the top-k.
    Renormalize,
}

/// Columns of the forward's output: `(D, lse, c1, c2)` per row.
const COLS: usize = 4;
/// Clamp of the tail masses (the same in the fused op and the composite).
const EPS: f64 = 1e-12;

/// Where the fused top-k KL runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused top-k KL runs on `student` logits (the teacher's ids are taken as `u32`,
/// its log-probs in the student's dtype).
pub fn supports(student: &Tensor) -> bool {
    SUPPORT.admits(student)
}

/// Per-token top-k KL `[..]` of student logits `[.., V]` against teacher `ids` and log-probs
/// `lpt` `[.., k]` (taken in [`stats_dtype`](super::stats_dtype) of the logits) (an entry with `lpt = -inf` is skipped), differentiable w.r.t. the student
/// only: the fused op where [`supports`], else [`composite::per_token`].
pub fn per_token(student: &Tensor, ids: &Tensor, lpt: &Tensor, tail: TopkTail, t: f64) -> Result<Tensor> {
    if supports(student) {
        return fused(student, ids, lpt, tail, t);
    }
    composite::per_token(student, ids, lpt, tail, t)
}

/// The fused per-token top-k KL.
fn fused(student: &Tensor, ids: &Tensor, lpt: &Tensor, tail: TopkTail, t: f64) -> Result<Tensor> {
    let zs = student.contiguous()?;
    let ids = ids.to_dtype(DType::U32)?.contiguous()?;
    let lpt = lpt.detach().to_dtype(super::stats_dtype(zs.dtype()))?.contiguous()?;
    let (sd, id) = (zs.dims(), ids.dims());
    if sd.len() != id.len() || sd[..sd.len() - 1] != id[..id.len() - 1] || ids.dims() != lpt.dims() {
        bail!(
            "top-k KL: student {:?}, ids {:?} and log-probs {:?} disagree",
            sd,
            id,
            lpt.dims()
        )
    }
    let out = zs.apply_op3(&ids, &lpt, TopkFwd { tail, inv_t: 1.0 / t })?;
    out.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)
}

/// The forward: `(D, lse, c1, c2)` per row.
struct TopkFwd {
    tail: TopkTail,
    inv_t: f64,
}

/// The backward: the dense `g dD/dz` from the logits, the ids, and the log-probs packed with
/// the row statistics.
struct TopkBwd {
    tail: TopkTail,
    inv_t: f64,
}

impl CustomOp3 for TopkFwd {
    fn name(&self) -> &'static str {
        "fused-topk-kl"
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
        cpu::fwd(self, [(s1, l1), (s2, l2), (s3, l3)])
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
        cuda::fwd(self, [(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        z: &Tensor,
        ids: &Tensor,
        lpt: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.narrow(D::Minus1, 0, 1)?;
        let aux = Tensor::cat(&[&res.detach(), &g], D::Minus1)?;
        // The ids stay a u32 input of their own; the teacher log-probs and the row statistics
        // travel packed in one tensor of the student's dtype.
        let packed = Tensor::cat(&[&lpt.detach(), &aux], D::Minus1)?.contiguous()?;
        let op = TopkBwd {
            tail: self.tail,
            inv_t: self.inv_t,
        };
        let gz = z.detach().apply_op3_no_bwd(ids, &packed, &op)?;
        Ok((leaf_grads::hand_over(z, gz)?, None, None))
    }
}

impl CustomOp3 for TopkBwd {
    fn name(&self) -> &'static str {
        "fused-topk-kl-grad"
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
