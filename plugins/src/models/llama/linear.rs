//! A linear layer in the Hugging Face layout (`weight` `[out, in]`, optional `bias` `[out]`),
//! dense (trainable, differentiable) or quantized (a frozen GGUF weight: Q4_0, Q4_1 and Q8_0
//! on the CPU through the block kernels of `kernels::cpu::quant`, any other format or device
//! through candle's `QMatMul`) or packed bf16 (a frozen weight of a bf16 model on the CPU,
//! `kernels::cpu::bf16_matmul`), or dense with bf16 products (a bf16 mixed-precision student on
//! the CPU: f32 weights, both factors of every product rounded to bf16, `kernels::cpu::linear`).

use std::convert::Infallible;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

use crate::kernels::cpu::bf16_matmul::{Bf16MatMul, Bf16Weight};
use crate::kernels::cpu::quant::{BlockWeight, QuantMatMul};

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense `[out, in]` tensor (a `Var`'s tensor when trainable).
    Dense(Tensor),
    /// A quantized `[out, in]` GGUF weight in a block format the CPU multiplies directly
    /// (activations stay f32; the weight gets no gradient, the input does).
    Blocks(QuantMatMul),
    /// Any other quantized `[out, in]` GGUF tensor; no gradient flows through it.
    Quantized(QMatMul),
    /// A frozen `[out, in]` weight in bf16, packed for the CPU's tile products (f32
    /// activations rounded to bf16, f32 sums; the input gets its gradient).
    Bf16(Bf16MatMul),
    /// A dense `[out, in]` f32 tensor (a trainable one) whose products, forward and backward,
    /// round both factors to bf16 and sum in f32 (`kernels::cpu::linear::linear_t_bf16`).
    DenseBf16(Tensor),
}

impl Weight {
    /// The frozen weight of a GGUF tensor: [`Weight::Blocks`] where the CPU kernels read its
    /// format, else candle's `QMatMul`.
    pub fn quantized(q: Arc<QTensor>) -> Result<Self> {
        Ok(match BlockWeight::from_qtensor(&q)? {
            Some(w) => Weight::Blocks(QuantMatMul(Arc::new(w))),
            None => Weight::Quantized(QMatMul::from_arc(q)?),
        })
    }

    /// The frozen bf16 weight of a dense `[out, in]` tensor.
    pub fn bf16(w: &Tensor) -> Result<Self> {
        Ok(Weight::Bf16(Bf16MatMul(Arc::new(Bf16Weight::from_tensor(w)?))))
    }
}

/// `y = x W^T + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `[out, in]`.
    pub weight: Weight,
    /// The bias, `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A dense layer.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// Applies the layer to `x` of any rank (the last dim is `in`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims
            .last()
            .ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inp))?;
        let y = match &self.weight {
            Weight::Dense(w) => return crate::models::nn::linear_out_in(x, w, self.bias.as_ref()),
            Weight::DenseBf16(w) => return crate::kernels::cpu::linear::linear_t_bf16(x, w, self.bias.as_ref()),
            Weight::Blocks(q) => q.forward(&x2)?,
            Weight::Quantized(q) => q.forward(&x2)?,
            Weight::Bf16(w) => w.forward(&x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let out = y.dim(1)?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = out;
        }
        y.reshape(out_dims)
    }

    /// The same layer cut off from autograd.
    pub fn detached(&self) -> Self {
        match self.map_dense::<Infallible>(&mut |t| Ok(t.detach())) {
            Ok(layer) => layer,
            Err(never) => match never {},
        }
    }

    /// The same layer with `f` applied to its dense tensors (weight and bias); quantized and
    /// bf16 weights are shared as they are.
    pub fn map_dense<E>(
        &self,
        f: &mut dyn FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        Ok(Linear {
            weight: match &self.weight {
                Weight::Dense(w) => Weight::Dense(f(w)?),
                Weight::DenseBf16(w) => Weight::DenseBf16(f(w)?),
                Weight::Blocks(q) => Weight::Blocks(q.clone()),
                Weight::Quantized(q) => Weight::Quantized(q.clone()),
                Weight::Bf16(w) => Weight::Bf16(w.clone()),
            },
            bias: self.bias.as_ref().map(f).transpose()?,
        })
    }
}
