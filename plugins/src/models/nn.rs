//! The layers models compose that choose among strategies rather than dispatch one op:
//! [`matmul`] and [`linear`] (BLAS with the `blas` feature, the CPU-only linear kernel on the
//! `gemm` crate, else candle's `matmul` and the bias add).
//!
//! The differentiable ops themselves (softmax, LayerNorm, RMSNorm, GELU, SwiGLU, attention)
//! are `crate::kernels`' entry functions: each runs its fused kernel where it is supported and
//! its composite of candle ops elsewhere. (candle's fast `LayerNorm`, `ops::softmax_last_dim`
//! and `ops::rms_norm` have no backward: `backward()` succeeds and the parameters silently get
//! no gradient; nothing here or there uses them for training.)

use candle_core::{Result, Tensor};

use crate::kernels::bias::add_bias;
#[cfg(feature = "blas")]
use crate::kernels::cpu::blas_matmul;
use crate::kernels::cpu::linear as cpu_linear;

/// `a @ b` (candle's batched `matmul` semantics): through BLAS (`kernels::cpu::blas_matmul`)
/// when the crate is built with the `blas` feature and both are CPU f32/f64 tensors with equal
/// batch dims; two CPU f32/f64 matrices through the fused linear kernel
/// (`kernels::cpu::linear`: `gemm` with AVX-512, the operands' strides read in place, no
/// zero-filled output); else candle's `matmul`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "blas")]
    if blas_matmul::supports(a, b) {
        return blas_matmul::matmul(a, b);
    }
    if a.rank() == 2 && b.rank() == 2 && cpu_linear::supports(a, b, None) {
        return cpu_linear::linear(a, b, None);
    }
    a.matmul(b)
}

/// `x @ w + b` with `w` `[in, out]` (any strides: the GPT-2 `Conv1D` layout as stored, or
/// `W.t()` of a `[out, in]` weight) and `b` optional, for `x` of any rank. On CPU f32/f64 this
/// is one fused kernel (`kernels::cpu::linear`: product and bias together, backward `dx`,
/// `dW`, `db` in place); elsewhere [`matmul`] then the bias add (`kernels::bias`).
pub fn linear_opt(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let fused = cpu_linear::supports(x, w, b);
    #[cfg(feature = "blas")]
    let fused = fused && !blas_matmul::supports(x, w);
    if fused {
        // Any rank: the kernel folds the leading dims itself (no reshape nodes).
        return cpu_linear::linear(x, w, b);
    }
    let dims = x.dims().to_vec();
    let (inp, out) = w.dims2()?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = matmul(&x.reshape((rows, inp))?, w)?;
    let y = match b {
        Some(b) => add_bias(&y, b)?,
        None => y,
    };
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1 checked by reshape") = out;
    y.reshape(out_dims)
}

/// `x @ w^T + b` with `w` stored `[out, in]` (the Hugging Face `nn.Linear` layout) and `b`
/// optional: on CPU f32/f64 the fused kernel with the weight as its operand
/// (`kernels::cpu::linear::linear_t`, whose `dW` goes to the parameter's leaf-gradient buffer
/// where the engine collects them); elsewhere [`linear_opt`] of `w.t()`.
pub fn linear_out_in(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let fused = cpu_linear::supports(x, w, b);
    #[cfg(feature = "blas")]
    let fused = fused && !blas_matmul::supports(x, &w.t()?);
    if fused {
        return cpu_linear::linear_t(x, w, b);
    }
    linear_opt(x, &w.t()?, b)
}

/// `x @ w + b` with `w` stored `[in, out]` (the GPT-2 `Conv1D` layout); see [`linear_opt`].
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_opt(x, w, Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn linear_handles_rank_3() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12., &dev)
            .expect("a")
            .reshape((2, 2, 3))
            .expect("r");
        let w = Tensor::ones((3, 4), DType::F32, &dev).expect("w");
        let b = Tensor::zeros(4, DType::F32, &dev).expect("b");
        let y = linear(&x, &w, &b).expect("lin");
        assert_eq!(y.dims(), &[2, 2, 4]);
        // Row [0, 1, 2] summed = 3.
        assert_eq!(
            y.get(0).expect("g").get(0).expect("g").to_vec1::<f32>().expect("v"),
            vec![3.0; 4]
        );
    }
}
