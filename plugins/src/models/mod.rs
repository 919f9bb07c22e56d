//! Model architectures shared by the student and teacher factories.

pub mod generate;
pub mod llama;
pub mod nn;
pub mod transformer;

/// The outputs of a forward pass asked for [`retort_core::LM_HEAD_TAP`]: the head's input
/// `hidden [batch, seq, width]` and `weight [vocab, width]` as the taps `lm_head.hidden` and
/// `lm_head.weight`, and logits `[batch, seq, 0]` (not computed).
pub fn lm_head_outputs(
    hidden: candle_core::Tensor,
    weight: candle_core::Tensor,
    mut taps: std::collections::BTreeMap<String, candle_core::Tensor>,
) -> candle_core::Result<retort_core::Outputs> {
    let (b, t, _) = hidden.dims3()?;
    let logits = candle_core::Tensor::zeros((b, t, 0), hidden.dtype(), hidden.device())?;
    taps.insert(retort_core::taps::LM_HEAD_HIDDEN.to_string(), hidden);
    taps.insert(retort_core::taps::LM_HEAD_WEIGHT.to_string(), weight);
    Ok(retort_core::Outputs { logits, taps })
}
