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
    /// Where the rows came from, when they are windows of a split's token stream (set by the
    /// pipeline's batchers; teachers that read stored outputs key by it). `None` for batches
    /// built by hand.
    pub source: Option<BatchSource>,
}

/// The origin of a batch's rows: row `b` is `tokens(split)[starts[b] .. starts[b] + seq]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSource {
    /// The split the windows were cut from.
    pub split: crate::Split,
    /// Start offset of each row in the split's token stream.
    pub starts: Vec<usize>,
}

impl Batch {
    /// The windows of `tokens` (the stream of `split`) starting at `starts`, `seq_len` tokens
    /// each, with their next-token targets, as one batch on `device`; records its
    /// [`BatchSource`]. Every window needs `seq_len + 1` tokens from its start.
    pub fn from_windows(
        tokens: &[u32],
        split: crate::Split,
        starts: &[usize],
        seq_len: usize,
        device: &candle_core::Device,
    ) -> crate::Result<Batch> {
        let mut inp = Vec::with_capacity(starts.len() * seq_len);
        let mut tgt = Vec::with_capacity(starts.len() * seq_len);
        for &s in starts {
            let w = tokens.get(s..s + seq_len + 1).ok_or_else(|| {
                crate::Error::Runtime(format!(
                    "window at {s} of {seq_len} tokens runs past the {} tokens of the {split:?} split",
                    tokens.len()
                ))
            })?;
            inp.extend_from_slice(&w[..seq_len]);
            tgt.extend_from_slice(&w[1..]);
        }
        let shape = (starts.len(), seq_len);
        Ok(Batch {
            input_ids: Tensor::from_vec(inp, shape, device)?,
            targets: Tensor::from_vec(tgt, shape, device)?,
            mask: None,
            source: Some(BatchSource {
                split,
                starts: starts.to_vec(),
            }),
        })
    }

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
