//! Incremental decoding: a model consuming token sequences in lockstep and handing the
//! next-token logits of each, the interface samplers drive.

use candle_core::Tensor;

use crate::Result;

/// A model decoding sequences of equal length in lockstep.
pub trait Decoder {
    /// Consumes `new` (`[batch, t]`: the prompts first, then one token per sequence per step)
    /// and returns the logits of the next token of every sequence, `[batch, vocab]`.
    fn next_logits(&mut self, new: &Tensor) -> Result<Tensor>;
}
