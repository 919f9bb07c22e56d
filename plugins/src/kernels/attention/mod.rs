//! Fused causal self-attention with backward: per sequence and head, `S = scale q k^T` (row `i`
//! keeps columns `j <= i`), `P = softmax(S)` row-wise, `y = P v`, in one op.
//!
//! No `[T, T]` tensor is allocated: each query row's scores live in a `T`-long scratch row.
//! The backward recomputes that row (scores, max, `exp` sum: the same `O(T d)` work as the
//! forward's) instead of keeping `P`, and from the saved output `y`:
//!
//! - `dP_ij = dy_i . v_j`, `delta_i = dy_i . y_i`, `dS_ij = P_ij (dP_ij - delta_i)`;
//! - `dq_i = scale sum_j dS_ij k_j`, `dk_j = scale sum_i dS_ij q_i`, `dv_j = sum_i P_ij dy_i`.
//!
//! Inputs `q [B, H, T, d]`, `k`, `v [B, H_kv, T, d]` (grouped-query attention when
//! `H_kv < H`: query head `h` reads key/value head `h / (H / H_kv)`) with any strides whose last
//! one is 1, so the transformer passes views of its fused `qkv` projection without copying.
//! The output is `[B, T, H d]`, the layout the output projection reads. Sequences run in
//! parallel on the rayon pool; on x86-64 CPUs with AVX-512 the row loops run in a copy of the
//! code compiled for it (chosen at run time), else in the baseline (SSE2) build.

pub mod composite;
pub(crate) mod cpu;
pub mod decode;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::Support;

/// Where the fused attention runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// Whether the fused attention runs on `q`, `k`, `v` (one dtype, one device).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    SUPPORT.admits_together(q, &[k, v])
}

/// Causal attention `softmax(scale q k^T + mask) v` of `q [B, H, T, d]`, `k`, `v` (any strides),
/// returned as `[B, T, H d]`: the fused op where [`supports`] (no `[T, T]` tensor, a backward
/// that recomputes the probabilities; `k`, `v` may have fewer heads, see [`fused`]), else
/// [`composite::causal_attention`] with the additive `mask` (`[T, T]`, see
/// [`crate::kernels::softmax::causal_mask`]; `k`, `v` `[B, H, T, d]` there).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if supports(q, k, v) {
        return fused(q, k, v, scale);
    }
    composite::causal_attention(q, k, v, scale, mask)
}

/// Causal attention read straight from a fused projection `qkv [B, T, (H + 2 H_kv) d]` (per
/// token: the `H` query heads, then the `H_kv` key heads, then the value heads, `d` wide each),
/// returned as `[B, T, H d]`: the same result as [`causal_attention`] on the `q`, `k`, `v`
/// views of `qkv`. Where [`supports`], one graph node whose gradient is one
/// `[B, T, (H + 2 H_kv) d]` tensor, so the backward accumulates no per-view zero-padded
/// gradients (candle turns each `narrow`/`get` of a view into a full-size zeroed tensor plus an
/// add); else [`composite::causal_attention_packed`] with `mask`.
pub fn causal_attention_packed(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    mask: &Tensor,
) -> Result<Tensor> {
    if supports(qkv, qkv, qkv) {
        return fused_packed(qkv, heads, kv_heads, scale);
    }
    composite::causal_attention_packed(qkv, heads, kv_heads, scale, mask)
}

/// The fused causal attention `softmax(scale q k^T) v` of `q [B, H, T, d]` and `k`,
/// `v [B, H_kv, T, d]` (`H_kv` dividing `H`), as `[B, T, H d]`; only where [`supports`] (for
/// callers with their own path elsewhere).
pub fn fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (bk, hk, tk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || k.dims() != v.dims() || hk == 0 || h % hk != 0 {
        bail!(
            "causal attention: expected q [B, H, T, d] and k, v [B, H_kv, T, d] with H_kv dividing H, got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let unit = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 || d == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    unit(q)?.apply_op3(&unit(k)?, &unit(v)?, Attention { scale })
}

/// The fused packed attention (see [`causal_attention_packed`]).
fn fused_packed(qkv: &Tensor, heads: usize, kv_heads: usize, scale: f64) -> Result<Tensor> {
    let (_, _, w) = qkv.dims3()?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || w % (heads + 2 * kv_heads) != 0 {
        bail!(
            "causal attention: qkv {:?} cannot hold {heads} query and 2 x {kv_heads} key/value heads of one width",
            qkv.dims()
        )
    }
    qkv.contiguous()?.apply_op1(Packed { heads, kv_heads, scale })
}

/// The attention on `(q, k, v)`.
struct Attention {
    scale: f64,
}

/// The backward: holds the forward's inputs and takes `(y, dy)`; returns `dq`, `dk`, `dv`
/// (each contiguous in its input's shape) one after the other in one flat tensor.
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
}

/// The packed op: sizes of the heads in the last dim of `qkv`.
struct Packed {
    heads: usize,
    kv_heads: usize,
    scale: f64,
}

/// The packed backward: holds `qkv`, takes `(y, dy)`, returns `d qkv` in `qkv`'s layout.
struct PackedBwd {
    qkv: Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
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
        cpu::fwd(self.scale, (s1, s2, s3), (l1, l2, l3))
    }

    // cuda_fwd: a CUDA implementation goes here, beside cpu_fwd (see the kernels map).

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBwd {
            q: q.detach(),
            k: k.detach(),
            v: v.detach(),
            scale: self.scale,
        };
        let packed = y.detach().apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.dims())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.dims())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.dims())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-causal-attention-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::bwd(self, (s1, l1), (s2, l2))
    }

    // cuda_fwd: a CUDA implementation goes here, beside cpu_fwd (see the kernels map).
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::packed_fwd(self, s, l)
    }

    // cuda_fwd: a CUDA implementation goes here, beside cpu_fwd (see the kernels map).

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = PackedBwd {
            qkv: qkv.detach(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            scale: self.scale,
        };
        Ok(Some(y.detach().apply_op2_no_bwd(&dy.contiguous()?, &op)?))
    }
}

impl CustomOp2 for PackedBwd {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::packed_bwd(self, (s1, l1), (s2, l2))
    }

    // cuda_fwd: a CUDA implementation goes here, beside cpu_fwd (see the kernels map).
}
