//! The rounding steps of the bf16 products' reference, as differentiable ops on CPU f32/f64
//! tensors: [`round_values`] rounds values to bf16 and passes gradients through unchanged;
//! [`round_gradient`] passes values unchanged and rounds the gradient. So
//! `round_gradient(round_values(x) round_values(W)^T)` has the value `b(x) b(W)^T` and the
//! gradients `b(dy) b(W)` and `b(dy)^T b(x)`: what `kernels::cpu::linear::linear_t_bf16`
//! computes, with every product exact in f64 (`b`: round to nearest even bf16).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::kernels::cpu::bf16_matmul::{from_bf16_bits, to_bf16_bits};
use crate::kernels::cpu::rows::slice;

/// `b(x)`, gradient unchanged.
pub fn round_values(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RoundValues)
}

/// `x`, gradient `b(dy)`.
pub fn round_gradient(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RoundGradient)
}

/// `b(x)` without a backward.
fn rounded(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Rounded)
}

fn round_f64(v: f64) -> f64 {
    // The values here are f32 values (inputs and cotangents are drawn in f32): exact in f32.
    from_bf16_bits(to_bf16_bits(v as f32)) as f64
}

/// The rounding itself.
struct Rounded;
/// [`round_values`]'s op.
struct RoundValues;
/// [`round_gradient`]'s op.
struct RoundGradient;

fn cpu_rounded(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let out = match s {
        CpuStorage::F32(_) => CpuStorage::F32(
            slice::<f32>(s, l, "bf16 rounding")?
                .iter()
                .map(|&v| from_bf16_bits(to_bf16_bits(v)))
                .collect(),
        ),
        CpuStorage::F64(_) => CpuStorage::F64(
            slice::<f64>(s, l, "bf16 rounding")?
                .iter()
                .map(|&v| round_f64(v))
                .collect(),
        ),
        other => bail!("bf16 rounding: expected f32 or f64, got {:?}", other.dtype()),
    };
    Ok((out, l.shape().clone()))
}

impl CustomOp1 for Rounded {
    fn name(&self) -> &'static str {
        "bf16-round"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_rounded(s, l)
    }
}

impl CustomOp1 for RoundValues {
    fn name(&self) -> &'static str {
        "bf16-round-values"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_rounded(s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
}

impl CustomOp1 for RoundGradient {
    fn name(&self) -> &'static str {
        "bf16-round-gradient"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((s.try_clone(l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rounded(g)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn values_and_gradients_are_rounded_where_each_op_says() -> Result<()> {
        let v = [1.0f64 + 1.0 / 512.0 + 1.0 / 4096.0, -3.3331, 1e-3];
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&Tensor::new(&v[..], &Device::Cpu)?.to_dtype(dtype)?)?;
            let want: Vec<f64> = v.iter().map(|&a| round_f64(a as f32 as f64)).collect();
            let y = round_values(x.as_tensor())?;
            assert_eq!(y.to_dtype(DType::F64)?.to_vec1::<f64>()?, want);
            let g = (y * 1.0)?.sum_all()?.backward()?;
            assert_eq!(
                g.get(&x).expect("dx").to_dtype(DType::F64)?.to_vec1::<f64>()?,
                vec![1.0; 3]
            );
            let c = Tensor::new(&v[..], &Device::Cpu)?.to_dtype(dtype)?;
            let y = round_gradient(x.as_tensor())?;
            assert_eq!(
                y.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                x.to_dtype(DType::F64)?.to_vec1::<f64>()?
            );
            let g = (y * c)?.sum_all()?.backward()?;
            assert_eq!(g.get(&x).expect("dx").to_dtype(DType::F64)?.to_vec1::<f64>()?, want);
        }
        Ok(())
    }
}
