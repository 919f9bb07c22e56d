//! One training or evaluation batch.

use candle_core::Tensor;

/// A batch of token windows: `input_ids[b, t]` predicts `targets[b, t]` (the next token).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `[batch, seq]`, u32.
    pub input_ids: Tensor,
    /// Next-token targets, `[batch, seq]`, u32.
    pub targets: Tensor,
    /// Optional per-token weight, `[batch, seq]`, f32: 1 for real tokens, 0 for padding.
    /// `None` means every token counts.
    pub mask: Option<Tensor>,
}

impl Batch {
    /// `(batch, seq)`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.input_ids.dims2()
    }

    /// Number of tokens that count (sum of the mask, or batch * seq).
    pub fn num_tokens(&self) -> candle_core::Result<f64> {
        match &self.mask {
            Some(m) => m.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>(),
            None => {
                let (b, t) = self.dims()?;
                Ok((b * t) as f64)
            }
        }
    }
}
