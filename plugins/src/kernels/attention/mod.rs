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
//!
//! # CUDA (feature `cuda`; f32, f64, f16, bf16; head dims `d <= 256`)
//!
//! `attention.cu`, FlashAttention-2 style (Dao 2023): no `[T, T]` tensor in memory. The
//! forward runs one block per (batch, head, 32 query rows): it walks the key/value tiles up to
//! the diagonal, staged in shared memory, with an online softmax (running max `m` and sum `l`
//! per row) and `P v` accumulated in registers in f32 (f64 for f64 storage), and writes `y` in
//! the storage dtype and the per-row `lse = m + ln l` (`[B, H, T]`, f32; f64 for f64).
//! The backward (deterministic: every gradient element is summed by one thread in a fixed
//! order, no atomics): `delta_i = dy_i . y_i` (one warp per row); `dk`, `dv` by one block per
//! (batch, kv head, 16 keys) over all query heads of its group and the query tiles at or after
//! the diagonal, `P` recomputed from `q`, `k` and `lse`; `dq` by one block per (batch, head,
//! 32 query rows) over the key tiles up to the diagonal. The kernels are compiled per head-dim
//! bucket `D` in 32/64/128/256 (`d <= D` at run time); the staged tiles have 32 rows, fewer
//! where two of them would pass 48 KB of static shared memory (`d > 128` in f32, `d > 64` in
//! f64).
//!
//! For bf16 and f16 storage and `d <= 128` the same loops run on tensor cores
//! (`attention_mma.cu`, the forward; `attention_mma_bwd.cu`, `dq` and `dk`/`dv`):
//! `mma.sync.m16n8k16` with f32 accumulators, 64 rows a block, 16 a warp, `P` and `dS` rounded
//! to the storage type for their products; `plan::Sizes::forward` and `plan::Sizes::backward` pick the
//! kernels (docs/gpu.md).
//!
//! The lse is kept, not recomputed: the forward sets it in the op (`Attention::lse`, a
//! `Mutex<Option<..>>`; candle calls `bwd` on the same op instance whose forward ran) and the
//! backward reads it. It costs `4 B H T` bytes; recomputing it would be one more `q k^T` pass
//! (half the forward's FLOPs, a seventh more on the nominal forward + backward). Where it is absent (not
//! expected), the backward runs the forward kernel again for it.
//!
//! FLOPs (causal, what a timing divides by): forward `4 B H T^2 d / 2` (`q k^T` and `P v`, 2
//! FLOPs per multiply-add, half the square); backward 2.5 times that (`q k^T` again, `dy v^T`,
//! `dS k`, `dS^T q`, `P^T dy`: `10 B H T^2 d / 2`); the deterministic split into a dk/dv and
//! a dq kernel computes `q k^T` and `dy v^T` in both, 7 products (3.5 times the forward's
//! work) where an atomic dq would need 5. The products are plain FMAs on shared-memory tiles
//! in f32/f64 and `mma.sync` tensor-core products in bf16/f16 (the emulated tests compute
//! them from the warp's fragments by the PTX ISA's layout); Hopper's `wgmma` is not used.

pub mod composite;
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
pub mod decode;
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
mod plan;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::Support;

/// Where the fused attention runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// The largest head dim of the CUDA kernels.
pub const MAX_CUDA_HEAD_DIM: usize = 256;

/// Whether the fused attention runs on `q`, `k`, `v` (one dtype, one device; on CUDA, head
/// dims up to [`MAX_CUDA_HEAD_DIM`]).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    SUPPORT.admits_together(q, &[k, v]) && head_dim_fits(q, q.dims().last().copied().unwrap_or(0))
}

/// Whether head dim `d` fits the kernels of `x`'s device (any on the CPU).
fn head_dim_fits(x: &Tensor, d: usize) -> bool {
    !x.device().is_cuda() || d <= MAX_CUDA_HEAD_DIM
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
    let width = qkv.dims().last().copied().unwrap_or(0);
    let d = width / (heads + 2 * kv_heads).max(1);
    if supports(qkv, qkv, qkv) && head_dim_fits(qkv, d) {
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
    unit(q)?.apply_op3(
        &unit(k)?,
        &unit(v)?,
        Attention {
            scale,
            lse: Saved::default(),
        },
    )
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
    qkv.contiguous()?.apply_op1(Packed {
        heads,
        kv_heads,
        scale,
        lse: Saved::default(),
    })
}

/// The forward's per-row log-sum-exp on CUDA (`[B, H, T]`, f32; f64 for f64 inputs).
#[cfg(feature = "cuda")]
type Lse = std::sync::Arc<candle_core::CudaStorage>;
/// Nothing to save without CUDA (no value).
#[cfg(not(feature = "cuda"))]
#[derive(Clone)]
enum Lse {}

/// What the CUDA forward saves for the backward of the same op (empty on the CPU, which
/// recomputes its rows).
#[derive(Default)]
struct Saved(std::sync::Mutex<Option<Lse>>);

impl Saved {
    /// The saved value, if any.
    fn get(&self) -> Option<Lse> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    #[cfg(feature = "cuda")]
    fn set(&self, lse: candle_core::CudaStorage) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(lse));
    }
}

/// The attention on `(q, k, v)`.
struct Attention {
    scale: f64,
    lse: Saved,
}

/// The backward: holds the forward's inputs and takes `(y, dy)`; returns `dq`, `dk`, `dv`
/// (each contiguous in its input's shape) one after the other in one flat tensor.
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: Option<Lse>,
}

/// The packed op: sizes of the heads in the last dim of `qkv`.
struct Packed {
    heads: usize,
    kv_heads: usize,
    scale: f64,
    lse: Saved,
}

/// The packed backward: holds `qkv`, takes `(y, dy)`, returns `d qkv` in `qkv`'s layout.
struct PackedBwd {
    qkv: Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    lse: Option<Lse>,
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
        let out = cuda::fwd(self.scale, (s1, l1), (s2, l2), (s3, l3))?;
        self.lse.set(out.lse);
        Ok((out.y, out.shape))
    }

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
            lse: self.lse.get(),
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::bwd(self, self.lse.as_deref(), (s1, l1), (s2, l2))
    }
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu::packed_fwd(self, s, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::packed_fwd(self, s, l)?;
        self.lse.set(out.lse);
        Ok((out.y, out.shape))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = PackedBwd {
            qkv: qkv.detach(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            scale: self.scale,
            lse: self.lse.get(),
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::packed_bwd(self, self.lse.as_deref(), (s1, l1), (s2, l2))
    }
}
