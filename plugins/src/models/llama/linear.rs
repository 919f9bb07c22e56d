//! A linear layer in the Hugging Face layout (`weight` `[out, in]`, optional `bias` `[out]`),
//! dense (trainable, differentiable) or quantized (a frozen GGUF weight run through
//! `QMatMul`).

use candle_core::quantized::QMatMul;
use candle_core::{Module, Result, Tensor};

/// The weight of a linear layer.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense `[out, in]` tensor (a `Var`'s tensor when trainable).
    Dense(Tensor),
    /// A quantized `[out, in]` GGUF tensor; no gradient flows through it.
    Quantized(QMatMul),
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
        let q = match &self.weight {
            Weight::Dense(w) => return crate::models::nn::linear_opt(x, &w.t()?, self.bias.as_ref()),
            Weight::Quantized(q) => q,
        };
        let y = q.forward(&x.reshape((rows, inp))?)?;
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
        Linear {
            weight: match &self.weight {
                Weight::Dense(w) => Weight::Dense(w.detach()),
                Weight::Quantized(q) => Weight::Quantized(q.clone()),
            },
            bias: self.bias.as_ref().map(Tensor::detach),
        }
    }
}
