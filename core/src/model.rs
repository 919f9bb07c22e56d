//! Models: the trainable [`Student`], the frozen [`Teacher`], and the adapter between them.

use std::path::Path;

use candle_core::{DType, Tensor, Var, D};

use crate::{Batch, Outputs, Result, TapSet};

/// Shape facts about a model that other components size themselves by (a projection between a
/// student and a teacher width, a head mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    /// Blocks (so hidden taps are `hidden.0 ..= hidden.{layers}`).
    pub layers: usize,
    /// Width of the hidden states.
    pub hidden: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Output vocabulary.
    pub vocab: usize,
    /// Longest window.
    pub context: usize,
    /// Dtype of the parameters and hidden states.
    pub dtype: candle_core::DType,
}

/// A language model that maps token windows to next-token logits (and taps).
pub trait Model: Send + Sync {
    /// Forward pass over `batch.input_ids`; computes the taps in `taps` besides the logits.
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs>;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Longest window the model accepts.
    fn context_len(&self) -> usize;
    /// Number of parameters (tied weights counted once).
    fn num_params(&self) -> usize;
    /// Taps this model can produce (for validating what terms ask for).
    fn available_taps(&self) -> Vec<String>;
    /// One-line human description (architecture and sizes).
    fn describe(&self) -> String;
    /// Shape facts.
    fn info(&self) -> ModelInfo;
    /// The dtype the forward pass computes in: the weights' ([`ModelInfo::dtype`], the
    /// default) or, under mixed precision, a half-precision dtype the weights are cast to (the
    /// training loop then scales the loss for f16, `train.loss_scale`).
    fn compute_dtype(&self) -> DType {
        self.info().dtype
    }
    /// Identity of the tokenizer the model was trained with, when its checkpoint carries one
    /// (see [`crate::Tokenizer::identity`]); checked against the data's at assembly.
    fn tokenizer_identity(&self) -> Option<String> {
        None
    }
    /// An incremental decoder of this model (a key/value cache), used to sample from it; `None`
    /// (the default) when it has none: samplers then re-run the window every token. Decoding
    /// needs no gradient.
    fn decoder(&self) -> Option<Box<dyn crate::Decoder + '_>> {
        None
    }
}

/// A trainable model.
pub trait Student: Model {
    /// Trainable parameters with their checkpoint names.
    fn vars(&self) -> Vec<(String, Var)>;
    /// Writes the model in Hugging Face layout (`config.json`, `model.safetensors`) into `dir`.
    /// Implementations write atomically: a crash never leaves a half-written file.
    fn save(&self, dir: &Path) -> Result<()>;
    /// The model's config as JSON (written as `config.json`).
    fn config_json(&self) -> serde_json::Value;
}

/// A frozen model that provides the targets of distillation.
pub trait Teacher: Send + Sync {
    /// Forward pass without gradient.
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs>;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Longest window the teacher accepts.
    fn context_len(&self) -> usize;
    /// Number of parameters.
    fn num_params(&self) -> usize;
    /// Taps this teacher can produce (besides patterns such as `topk.{k}`).
    fn available_taps(&self) -> Vec<String>;
    /// Whether the teacher can produce tap `name`.
    fn supports_tap(&self, name: &str) -> bool {
        self.available_taps().iter().any(|t| t == name)
    }
    /// One-line human description.
    fn describe(&self) -> String;
    /// Shape facts.
    fn info(&self) -> ModelInfo;
    /// Identity of the teacher's tokenizer, when its checkpoint carries one.
    fn tokenizer_identity(&self) -> Option<String> {
        None
    }
    /// `Some(k)` when the teacher has no dense logits, only its top-`j` distribution for
    /// `j <= k` (the taps `topk.{j}`), e.g. a teacher read from a logit cache. Its
    /// [`Outputs::logits`] are then `[batch, seq, 0]`, and terms that need dense teacher
    /// logits are refused at assembly. Default `None`: dense logits.
    fn sparse_topk(&self) -> Option<usize> {
        None
    }
    /// `Some(seq_len)` when the teacher has outputs only for windows of `seq_len` tokens that
    /// start at multiples of `seq_len` (see [`crate::BatchSource`]): the run must use that
    /// window length and `train.windows = "aligned"`. Default `None`: any window.
    fn aligned_windows(&self) -> Option<usize> {
        None
    }
    /// Checks that the teacher's stored outputs were made from this run's data (token streams
    /// of both splits, tokenizer, window length); an error names the mismatch. Called at
    /// assembly. Default: nothing to check.
    fn check_data(&self, _data: &dyn crate::DataSource, _seq_len: usize) -> Result<()> {
        Ok(())
    }
    /// An incremental decoder of the teacher, as [`Model::decoder`]. Default `None`.
    fn decoder(&self) -> Option<Box<dyn crate::Decoder + '_>> {
        None
    }
}

/// The top-`k` ids and log-probabilities (temperature 1, descending) of dense `logits`
/// `[.., vocab]`.
pub fn dense_topk(logits: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logprobs = shifted.broadcast_sub(&lse)?;
    let ids = logprobs
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, k)?
        .contiguous()?;
    let top = logprobs.contiguous()?.gather(&ids, D::Minus1)?;
    Ok((ids, top))
}

/// Dense log-probabilities `[.., vocab]` from a top-`k` distribution (`ids`, `logprobs`
/// `[.., k]`): the top-`k` entries as given, the tail mass `m = 1 - sum exp(logprobs)` (at
/// least 1e-12) spread uniformly over the other `vocab - k` ids. Used where a sparse teacher
/// must stand in for dense logits (evaluation figures), never inside a loss term.
pub fn dense_from_topk(ids: &Tensor, logprobs: &Tensor, vocab: usize) -> Result<Tensor> {
    let lp = match logprobs.dtype() {
        DType::F64 => logprobs.clone(),
        _ => logprobs.to_dtype(DType::F32)?,
    };
    let k = lp.dim(D::Minus1)?;
    let mut shape = lp.dims().to_vec();
    *shape
        .last_mut()
        .ok_or_else(|| crate::Error::Runtime("dense_from_topk: rank-0 log-probs".into()))? = vocab;
    let tail = if vocab > k {
        let m = lp.exp()?.sum_keepdim(D::Minus1)?.affine(-1.0, 1.0)?.maximum(1e-12)?;
        (m / (vocab - k) as f64)?.log()?
    } else {
        lp.min_keepdim(D::Minus1)?.affine(1.0, -1e4)?
    };
    let base = tail.broadcast_as(shape.as_slice())?.contiguous()?;
    let delta = lp.broadcast_sub(&tail)?.contiguous()?;
    Ok(base.scatter_add(&ids.contiguous()?, &delta, D::Minus1)?)
}

/// Any [`Model`] used as a frozen teacher: outputs are detached from the autograd graph.
pub struct FrozenTeacher<M: ?Sized>(pub Box<M>);

impl<M: Model + ?Sized> Teacher for FrozenTeacher<M> {
    /// The model's outputs, detached; `topk.{k}` taps are computed from the dense logits.
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        let mut out = self.0.forward(batch, taps)?.detach();
        // A teacher computing in a half type hands f32 to the losses (the student's type).
        if matches!(out.logits.dtype(), DType::BF16 | DType::F16) {
            out.logits = out.logits.to_dtype(DType::F32)?;
            for t in out.taps.values_mut() {
                if matches!(t.dtype(), DType::BF16 | DType::F16) {
                    *t = t.to_dtype(DType::F32)?;
                }
            }
        }
        for k in taps.iter().filter_map(crate::taps::parse_topk_tap) {
            let (ids, logprobs) = dense_topk(&out.logits, k)?;
            out.taps.insert(format!("topk.{k}.ids"), ids);
            out.taps.insert(format!("topk.{k}.logprobs"), logprobs);
        }
        Ok(out)
    }
    fn supports_tap(&self, name: &str) -> bool {
        match crate::taps::parse_topk_tap(name) {
            Some(k) => k >= 1 && k <= self.0.vocab_size(),
            None => self.0.available_taps().iter().any(|t| t == name),
        }
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn context_len(&self) -> usize {
        self.0.context_len()
    }
    fn num_params(&self) -> usize {
        self.0.num_params()
    }
    fn available_taps(&self) -> Vec<String> {
        self.0.available_taps()
    }
    fn describe(&self) -> String {
        format!("frozen {}", self.0.describe())
    }
    fn info(&self) -> ModelInfo {
        self.0.info()
    }
    fn tokenizer_identity(&self) -> Option<String> {
        self.0.tokenizer_identity()
    }
    fn decoder(&self) -> Option<Box<dyn crate::Decoder + '_>> {
        self.0.decoder()
    }
}
