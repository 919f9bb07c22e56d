//! `dL/dW = sum_c G_c^T h_c`, summed chunk by chunk: in place by the `gemm` crate for CPU
//! f32/f64 (no `[V, H]` temporary per chunk), by candle's `matmul` and an add elsewhere.

use candle_core::{DType, Device, Result, Storage, Tensor};

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::linear;
use crate::kernels::cpu::raw::gemm::{gemm_into, Mat};
use crate::kernels::cpu::rows::slice;

/// The running sum of `G_c^T h_c`, `[V, H]`.
pub enum WeightGrad {
    /// CPU f32, row-major.
    F32(Vec<f32>, (usize, usize)),
    /// CPU f64, row-major.
    F64(Vec<f64>, (usize, usize)),
    /// Any other device or dtype: a tensor (none before the first chunk).
    Tensor(Option<Tensor>),
}

impl WeightGrad {
    /// Zero, for a weight of `dims` `(V, H)` of `dtype` on `device`.
    pub fn zeros(dims: (usize, usize), dtype: DType, device: &Device) -> Self {
        match (device, dtype) {
            (Device::Cpu, DType::F32) => WeightGrad::F32(vec![0.0; dims.0 * dims.1], dims),
            (Device::Cpu, DType::F64) => WeightGrad::F64(vec![0.0; dims.0 * dims.1], dims),
            _ => WeightGrad::Tensor(None),
        }
    }

    /// Adds `g^T h` for `g [C, V]` and `h [C, H]` (contiguous, of the accumulator's dtype).
    pub fn add(&mut self, g: &Tensor, h: &Tensor) -> Result<()> {
        match self {
            WeightGrad::F32(acc, _) => add_in_place(acc, g, h),
            WeightGrad::F64(acc, _) => add_in_place(acc, g, h),
            WeightGrad::Tensor(acc) => {
                // Half-precision chunks (mixed precision) are summed in f32.
                let p = product(&g.t()?, h)?;
                let p = match p.dtype() {
                    DType::BF16 | DType::F16 => p.to_dtype(DType::F32)?,
                    _ => p,
                };
                *acc = Some(match acc.take() {
                    Some(a) => (a + p)?,
                    None => p,
                });
                Ok(())
            }
        }
    }

    /// The sum as a `[V, H]` tensor (zeros when nothing was added) of `dtype` on `device`.
    pub fn finish(self, dims: (usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            WeightGrad::F32(v, d) => Tensor::from_vec(v, d, device),
            WeightGrad::F64(v, d) => Tensor::from_vec(v, d, device),
            WeightGrad::Tensor(Some(t)) => t.to_dtype(dtype),
            WeightGrad::Tensor(None) => Tensor::zeros(dims, dtype, device),
        }
    }
}

/// `a @ b` for matrices: the CPU linear kernel (`gemm`, the operands' strides read in place)
/// where it runs, candle's `matmul` elsewhere (cuBLAS on CUDA).
pub fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if linear::supports(a, b, None) {
        return linear::linear(a, b, None);
    }
    a.matmul(b)
}

/// `acc [V, H] += g^T h` by one `gemm` call.
fn add_in_place<T: Real>(acc: &mut [T], g: &Tensor, h: &Tensor) -> Result<()> {
    let ((c, v), (c2, width)) = (g.dims2()?, h.dims2()?);
    if c != c2 || acc.len() != v * width {
        candle_core::bail!(
            "lm_head: chunk gradient {:?} and input {:?} do not match",
            g.dims(),
            h.dims()
        );
    }
    let (g, h) = (g.contiguous()?, h.contiguous()?);
    let (gs, gl) = g.storage_and_layout();
    let (hs, hl) = h.storage_and_layout();
    let (Storage::Cpu(gs), Storage::Cpu(hs)) = (&*gs, &*hs) else {
        candle_core::bail!("lm_head: expected CPU tensors")
    };
    let (gd, hd) = (
        slice::<T>(gs, gl, "lm_head gradient")?,
        slice::<T>(hs, hl, "lm_head input")?,
    );
    gemm_into(acc, true, &Mat::dense(gd, c, v).t(), &Mat::dense(hd, c, width));
    Ok(())
}
