//! Incremental decoding of the GPT-2-style [`Transformer`] with a key/value cache: the prompts
//! run once, then one token per sequence per step attends to every cached position. When the
//! context is full, decoding restarts from the last half-context of tokens.

use candle_core::Tensor;

use retort_core::Result;

use super::{Block, Transformer};
use crate::models::generate::{CachedDecoder, KvModel};
use crate::models::nn::{linear, matmul};

/// A transformer and its key/value cache.
pub struct TransformerCache<'a> {
    model: &'a Transformer,
    /// Keys and values per block, `[batch, heads, pos, head_dim]`.
    cache: Vec<Option<(Tensor, Tensor)>>,
}

/// The [`Decoder`] of a transformer (frozen or in training: the cache keeps no gradient).
pub type TransformerDecoder<'a> = CachedDecoder<TransformerCache<'a>>;

impl<'a> CachedDecoder<TransformerCache<'a>> {
    /// An empty cache for `model`.
    pub fn new(model: &'a Transformer) -> Self {
        Self::with(TransformerCache {
            model,
            cache: vec![None; model.blocks.len()],
        })
    }
}

impl KvModel for TransformerCache<'_> {
    fn cached(&self) -> Result<usize> {
        Ok(match &self.cache[0] {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        })
    }

    fn reset(&mut self) {
        self.cache = vec![None; self.model.blocks.len()];
    }

    /// Logits `[batch, t, vocab]` of `ids` `[batch, t]` at positions `pos..pos + t`.
    fn extend(&mut self, ids: &Tensor) -> Result<Tensor> {
        let m = self.model;
        let (b, t) = ids.dims2()?;
        let pos = self.cached()?;
        let d = m.cfg.n_embd;
        let tok = m.wte.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, d))?;
        let mut x = tok.broadcast_add(&m.wpe.narrow(0, pos, t)?)?.detach();
        for (blk, slot) in m.blocks.iter().zip(self.cache.iter_mut()) {
            x = block_step(m, blk, &x, pos, slot)?;
        }
        let x = m.norm(&x, &m.ln_f, m.cfg.layer_norm_eps)?;
        let logits = matmul(&x.reshape((b * t, d))?, &m.wte.t()?)?;
        Ok(logits.reshape((b, t, m.cfg.vocab_size))?.detach())
    }

    fn context(&self) -> usize {
        self.model.cfg.context
    }
}

/// One block on new positions `pos..pos + t`, appending their keys and values to `slot`.
fn block_step(
    m: &Transformer,
    blk: &Block,
    x: &Tensor,
    pos: usize,
    slot: &mut Option<(Tensor, Tensor)>,
) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let nh = m.cfg.n_head;
    let hd = d / nh;
    let eps = m.cfg.layer_norm_eps;
    let h = m.norm(x, &blk.ln_1, eps)?;
    let qkv = linear(&h, &blk.c_attn.0, &blk.c_attn.1)?
        .reshape((b, t, 3, nh, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let q = (qkv.get(0)? * (1.0 / (hd as f64).sqrt()))?.contiguous()?;
    let (k, v) = (qkv.get(1)?.contiguous()?.detach(), qkv.get(2)?.contiguous()?.detach());
    let (k, v) = match slot.take() {
        Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        None => (k, v),
    };
    *slot = Some((k.clone(), v.clone()));
    let mut scores = matmul(&q, &k.t()?)?;
    if t > 1 {
        // New position `pos + i` sees cached positions `0..=pos + i`.
        let mask = m.mask.narrow(0, pos, t)?.narrow(1, 0, pos + t)?;
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = if m.is_half() {
        // Reductions in f32 for a half-precision model.
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(candle_core::DType::F32)?)?.to_dtype(v.dtype())?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let y = matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, t, d))?;
    Ok(m.after_attention(blk, x, &y)?.detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::generate::{sample_batch, Sampling, WindowDecoder};
    use candle_core::{DType, Device};
    use retort_core::Decoder;
    use retort_core::{Batch, Model, TapSet};

    fn model(activation: &str, dtype: &str) -> Transformer {
        let params = retort_core::Params::new(
            "student",
            serde_json::json!({"n_layer": 2, "n_embd": 16, "n_head": 2, "context": 12, "vocab_size": 11,
                               "activation": activation, "dtype": dtype, "init_std": 0.3})
            .as_object()
            .expect("object")
            .clone(),
        );
        let (cfg, _) = super::super::TransformerConfig::resolve(&params, None).expect("resolve");
        Transformer::init(cfg, 4, &Device::Cpu).expect("init")
    }

    fn full_logits(m: &Transformer, ids: &Tensor) -> Tensor {
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids.clone(),
            mask: None,
            source: None,
        };
        m.forward(&batch, &TapSet::none()).expect("forward").logits
    }

    #[test]
    fn cached_logits_equal_the_full_forward_at_every_position() {
        for (activation, dtype, tol) in [("gelu", "f32", 1e-5), ("relu", "f64", 1e-10)] {
            let m = model(activation, dtype);
            let ids = Tensor::new(
                &[[1u32, 4, 2, 7, 3, 3, 9, 0, 5], [2, 2, 8, 1, 6, 10, 4, 4, 1]],
                &Device::Cpu,
            )
            .expect("ids");
            let full = full_logits(&m, &ids).to_dtype(DType::F64).expect("f64");
            let mut dec = TransformerDecoder::new(&m);
            // A prompt of 4, then one token at a time.
            let mut got = vec![dec.next_logits(&ids.narrow(1, 0, 4).expect("p")).expect("prompt")];
            for i in 4..9 {
                got.push(dec.next_logits(&ids.narrow(1, i, 1).expect("tok")).expect("step"));
            }
            for (j, g) in got.iter().enumerate() {
                let want = full.narrow(1, 3 + j, 1).expect("n").squeeze(1).expect("s");
                let diff = (g.to_dtype(DType::F64).expect("f64") - want)
                    .expect("d")
                    .abs()
                    .expect("a")
                    .max_all()
                    .expect("m")
                    .to_scalar::<f64>()
                    .expect("s");
                assert!(diff < tol, "{activation}/{dtype} position {}: {diff}", 3 + j);
            }
        }
    }

    #[test]
    fn greedy_decoding_matches_the_window_decoder_past_the_context() {
        let m = model("gelu", "f32");
        let forward = |ids: &Tensor| Ok(full_logits(&m, ids));
        let prompts = vec![vec![1u32, 2, 3], vec![7, 7, 0]];
        let s = Sampling {
            max_tokens: 8,
            ..Sampling::default()
        };
        let dev = Device::Cpu;
        // Within the context the two decoders agree token for token.
        let cached = sample_batch(&mut TransformerDecoder::new(&m), &prompts, None, &s, &dev).expect("cached");
        let window = sample_batch(&mut WindowDecoder::new(&forward, 12), &prompts, None, &s, &dev).expect("window");
        assert_eq!(cached, window);
        // Past the context (12) the cache restarts from the last half-context and keeps going.
        let long = Sampling { max_tokens: 20, ..s };
        let out = sample_batch(&mut TransformerDecoder::new(&m), &prompts, None, &long, &dev).expect("long");
        assert!(out.iter().all(|o| o.len() == 20));
    }
}
