//! The student's head as the chunks multiply by it: `z_c = h_c W^T` and `dL/dh_c = G_c W`, in
//! the weight's dtype (the candle and `gemm` products of [`super::weight_grad`]) or, for a head
//! handed with `lm_head.bf16_products` (a bf16 student on the CPU), in bf16 products: both
//! factors rounded to bf16, f32 sums (`kernels::cpu::bf16_matmul`), with `W` and `W^T` packed
//! once per step.

use candle_core::{DType, Storage, Tensor, Var};

use retort_core::{Error, Result};

use super::weight_grad::{logits_var, product as matmul};
use crate::kernels::cpu::bf16_matmul::Bf16Weight;
use crate::kernels::cpu::linear::Products;
use crate::kernels::cpu::raw::gemm::Mat;
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::slice;

/// The head `W [V, H]` of one step.
pub enum StudentHead {
    /// Multiplied in its own dtype.
    Native(Tensor),
    /// An f32 CPU weight multiplied in bf16 products, packed for `h W^T` (`rows`) and for
    /// `G W` (`cols`).
    Bf16 { rows: Bf16Weight, cols: Bf16Weight },
}

impl StudentHead {
    /// The head `w` (detached), in bf16 products when `bf16`.
    pub fn new(w: &Tensor, bf16: bool) -> Result<Self> {
        if !bf16 {
            return Ok(StudentHead::Native(w.clone()));
        }
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            return Err(Error::Runtime(format!(
                "the fused LM-head loss multiplies a head in bf16 products only as an f32 CPU tensor, got {:?} on {:?}",
                w.dtype(),
                w.device()
            )));
        }
        let (v, h) = w.dims2()?;
        let w = w.contiguous()?;
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            return Err(Error::Runtime("lm_head weight: expected a CPU tensor".into()));
        };
        let (rows, cols) = Bf16Weight::pack_both(slice::<f32>(s, layout, "lm_head weight")?, v, h);
        Ok(StudentHead::Bf16 { rows, cols })
    }

    /// How the weight's gradient `G^T h` is to multiply.
    pub fn products(&self) -> Products {
        match self {
            StudentHead::Native(_) => Products::Native,
            StudentHead::Bf16 { .. } => Products::Bf16,
        }
    }

    /// The chunk's logits `h W^T` (`h [C, H]`) as a fresh variable of shape `dims`.
    pub fn logits(&self, h: &Tensor, dims: (usize, usize, usize)) -> Result<Var> {
        match self {
            StudentHead::Native(w) => Ok(logits_var(h, w, dims)?),
            StudentHead::Bf16 { rows, .. } => {
                let z = bf16_product(rows, h, "lm_head input")?;
                Ok(Var::from_tensor(&z.reshape(dims)?)?)
            }
        }
    }

    /// `dL/dh = G W` for the chunk's `G [C, V]`.
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            StudentHead::Native(w) => Ok(matmul(g, w)?),
            StudentHead::Bf16 { cols, .. } => bf16_product(cols, g, "lm_head gradient"),
        }
    }
}

/// `a W^T` in bf16 products for the f32 CPU matrix `a`.
fn bf16_product(w: &Bf16Weight, a: &Tensor, what: &str) -> Result<Tensor> {
    let a = a.contiguous()?;
    let (m, k) = a.dims2()?;
    let n = w.dims().0;
    let mut out = output_vec::<f32>(m * n);
    {
        let (storage, layout) = a.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            return Err(Error::Runtime(format!("{what}: expected a CPU tensor")));
        };
        w.product_into(&mut out, false, &Mat::dense(slice::<f32>(s, layout, what)?, m, k));
    }
    Ok(Tensor::from_vec(out, (m, n), a.device())?)
}
