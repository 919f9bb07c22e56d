//! Fused rotary position embedding (Su et al., 2021, "RoFormer") with its backward.
//!
//! `x` `[B, H, T, d]` (`d` even) and tables `cos`, `sin` `[T, d/2]` (row `t` the angles of the
//! `t`-th position of `x`: a model narrows its tables to `offset..offset + T`). Each row of `x`
//! is `d/2` pairs `(x0, x1)`: `(x[i], x[i + d/2])` half-split (Hugging Face's `rotate_half`), or
//! `(x[2i], x[2i + 1])` interleaved (llama.cpp / GGUF); pair `i` of position `t` rotates by the
//! angle of `(cos, sin)[t, i]`:
//! `r0 = x0 cos - x1 sin`, `r1 = x0 sin + x1 cos`.
//! The backward is the inverse rotation of the incoming gradient:
//! `dx0 = dr0 cos + dr1 sin`, `dx1 = -dr0 sin + dr1 cos`, i.e. the forward with `-sin`; the
//! tables (constants of the model) get no gradient.
//!
//! One pass over `x` where the composite takes a dozen graph nodes (`narrow`s, four
//! `broadcast_mul`s, a `sub`, an `add`, a `cat` or `stack`, each with its own gradient
//! buffers in candle's backward). CPU: rows of `x` on the rayon pool, f32/f64. CUDA
//! (`rope.cu`): one thread per pair in a grid-stride loop, f32/f64/f16/bf16 (math in f32, f64
//! for f64).

pub mod composite;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(all(test, feature = "cuda-emulate"))]
mod cuda_emulated;
#[cfg(test)]
mod tests;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::Support;

/// Where the fused RoPE runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: super::CUDA_FLOATS,
};

/// Whether the fused RoPE runs on `x` with tables `cos`, `sin` (one dtype, one device).
pub fn supports(x: &Tensor, cos: &Tensor, sin: &Tensor) -> bool {
    SUPPORT.admits_together(x, &[cos, sin])
}

/// Rotates `x` `[B, H, T, d]` by the angles of `cos`, `sin` `[T, d/2]` (pairs half-split, or
/// `interleaved`), differentiable w.r.t. `x`: the fused op where [`supports`], else
/// [`composite::rope`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    check(x, cos, sin)?;
    if supports(x, cos, sin) {
        return fused(x, cos, sin, interleaved);
    }
    composite::rope(x, cos, sin, interleaved)
}

/// `x` is `[B, H, T, d]` with `d` even and non-zero, and both tables are `[T, d/2]`.
fn check(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let (_, _, t, d) = x.dims4()?;
    if d == 0 || d % 2 != 0 {
        bail!("rope: the head dim of x {:?} must be even and non-zero", x.dims())
    }
    for (name, table) in [("cos", cos), ("sin", sin)] {
        if table.dims() != [t, d / 2] {
            bail!(
                "rope: the {name} table {:?} must be [{t}, {}] for x {:?}",
                table.dims(),
                d / 2,
                x.dims()
            )
        }
    }
    Ok(())
}

/// The fused rotation (shapes checked by [`check`]).
fn fused(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let op = RopeOp {
        interleaved,
        inverse: false,
    };
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
}

/// The rotation of `x` (`inverse`: by the negated angles, the backward) on operands
/// `(x, cos, sin)`: `x` contiguous `[B, H, T, d]`, the tables contiguous `[T, d/2]`.
#[derive(Debug, Clone, Copy)]
struct RopeOp {
    /// Pairs `(2i, 2i + 1)` rather than `(i, i + d/2)`.
    interleaved: bool,
    /// Rotate by `-angle` (sin negated).
    inverse: bool,
}

/// `(rows, t, half)` of operands `x` `[B, H, T, d]` and tables `[T, d/2]`: `rows = B H T`
/// rows of `x`, row `r` at position `r mod T`. Checked again here, where a storage arrives.
fn sizes(op: &str, x: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize, usize)> {
    let (b, h, t, d) = x.shape().dims4()?;
    if d == 0 || d % 2 != 0 || cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        bail!(
            "{op}: x {:?} and tables {:?}, {:?} disagree (expected [T, d/2] and d even)",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    Ok((b * h * t, t, d / 2))
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        if self.inverse {
            "fused-rope-grad"
        } else {
            "fused-rope"
        }
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

    /// `dx`: the inverse rotation of `grad`; no gradient for the tables.
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = RopeOp {
            interleaved: self.interleaved,
            inverse: !self.inverse,
        };
        let dx = grad.contiguous()?.apply_op3_no_bwd(&cos.detach(), &sin.detach(), &op)?;
        Ok((Some(dx), None, None))
    }
}

/// The launch of `rope.cu`'s kernel over `pairs` pairs: blocks of [`THREADS`] threads, one pair
/// per thread, at most [`MAX_BLOCKS`] blocks (the kernel strides over the rest).
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
fn grid(pairs: usize) -> super::grid::Grid {
    super::grid::Grid {
        blocks: (pairs.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        threads: (THREADS as u32, 1, 1),
        shared_bytes: 0,
    }
}

/// Threads per block of the CUDA kernel.
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
const THREADS: usize = 256;

/// Blocks of one launch of the CUDA kernel (a grid-stride loop covers larger tensors).
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emulate")))]
const MAX_BLOCKS: usize = 65_535;
