//! Autoregressive sampling from any model's next-token logits, many sequences at once: greedy
//! at temperature 0, else softmax at temperature `T` restricted to the `top_k` most likely
//! tokens and the smallest top-p nucleus, drawn from a seeded ChaCha8 stream per sequence
//! (stream `i` for sequence `i`, so a sequence's tokens do not depend on the batch it is in).
//! A [`Decoder`] feeds the model: [`WindowDecoder`] works with any model and re-runs the window
//! every step; [`CachedDecoder`] decodes a model with a key/value cache ([`KvModel`]: the
//! llama here, the transformer in its module) incrementally.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::kernels::cpu::fastmath::exp_shifted_sum;

pub use retort_core::Decoder;
use retort_core::{Error, Result};

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only; 0 = no limit.
    pub top_k: usize,
    /// Seed of the sampling stream.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

/// The index of the next token given last-position `logits` (`[vocab]`, f32).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> usize {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    // e^((x - max) / T), vectorised in f32 (summed in f64).
    let inv_t = (1.0 / s.temperature) as f32;
    let mut w: Vec<f32> = logits.iter().map(|&x| x * inv_t).collect();
    let z = exp_shifted_sum(&mut w);
    if s.top_k == 0 && s.top_p >= 1.0 {
        // The whole distribution: no order needed and no (index, probability) pairs (a sort
        // of the vocabulary per token was a tenth of a batched decode step).
        let u = rng.random::<f64>();
        let mut acc = 0.0;
        for (i, &q) in w.iter().enumerate() {
            acc += q as f64 / z;
            if acc >= u {
                return i;
            }
        }
        return w.len() - 1;
    }
    let mut p: Vec<(usize, f64)> = w.iter().map(|&q| q as f64 / z).enumerate().collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let limit = if s.top_k == 0 { p.len() } else { s.top_k.min(p.len()) };
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, q) in &p[..limit] {
        kept += 1;
        mass += q;
        if mass >= s.top_p {
            break;
        }
    }
    draw(&p[..kept], mass, rng)
}

/// The index drawn from `(index, probability)` pairs of total `mass` by inverse CDF.
fn draw(p: &[(usize, f64)], mass: f64, rng: &mut ChaCha8Rng) -> usize {
    let u = rng.random::<f64>() * mass;
    let mut acc = 0.0;
    for (i, q) in p {
        acc += q;
        if acc >= u {
            return *i;
        }
    }
    p[p.len() - 1].0
}

/// Any model: every step re-runs the last `context` tokens of every sequence.
pub struct WindowDecoder<'a> {
    forward: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    context: usize,
    ids: Option<Tensor>,
}

impl<'a> WindowDecoder<'a> {
    /// `forward` maps ids `[batch, seq]` to logits `[batch, seq, vocab]`; windows longer than
    /// `context` keep their last `context` tokens.
    pub fn new(forward: &'a dyn Fn(&Tensor) -> Result<Tensor>, context: usize) -> Self {
        WindowDecoder {
            forward,
            context: context.max(1),
            ids: None,
        }
    }
}

impl Decoder for WindowDecoder<'_> {
    fn next_logits(&mut self, new: &Tensor) -> Result<Tensor> {
        let ids = match self.ids.take() {
            Some(old) => Tensor::cat(&[&old, new], 1)?,
            None => new.clone(),
        };
        let len = ids.dim(1)?;
        let start = len.saturating_sub(self.context);
        let logits = (self.forward)(&ids.narrow(1, start, len - start)?)?;
        self.ids = Some(ids);
        let t = logits.dim(1)?;
        Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?)
    }
}

/// A model that runs new positions through a key/value cache it owns.
pub trait KvModel {
    /// Positions cached.
    fn cached(&self) -> Result<usize>;
    /// Empties the cache.
    fn reset(&mut self);
    /// Logits `[batch, t, vocab]` of `ids` `[batch, t]` at the next `t` positions, whose keys
    /// and values are appended to the cache.
    fn extend(&mut self, ids: &Tensor) -> Result<Tensor>;
    /// Positions the model attends over at most.
    fn context(&self) -> usize;
}

/// A [`KvModel`] as a [`Decoder`]: the prompts run once, then one token per step. When the
/// cache reaches the context, decoding restarts from the last half-context of tokens.
pub struct CachedDecoder<M> {
    model: M,
    ids: Option<Tensor>,
}

impl<M: KvModel> CachedDecoder<M> {
    /// Decodes through `model` (its cache empty).
    pub fn with(model: M) -> Self {
        CachedDecoder { model, ids: None }
    }
}

/// The [`Decoder`] of a llama.
pub type LlamaDecoder<'a> = CachedDecoder<LlamaCache<'a>>;

impl<'a> CachedDecoder<LlamaCache<'a>> {
    /// A llama with an empty cache (frozen or in training: decoding keeps no gradient).
    pub fn new(model: &'a crate::models::llama::Llama) -> Self {
        Self::with(LlamaCache {
            model,
            cache: model.new_cache(),
        })
    }
}

impl<M: KvModel> Decoder for CachedDecoder<M> {
    fn next_logits(&mut self, new: &Tensor) -> Result<Tensor> {
        let context = self.model.context();
        let first = self.ids.is_none();
        let ids = match self.ids.take() {
            Some(old) => Tensor::cat(&[&old, new], 1)?,
            None => new.clone(),
        };
        let len = ids.dim(1)?;
        let mut feed = new.clone();
        if self.model.cached()? + new.dim(1)? > context {
            self.model.reset();
            let keep = if first { context } else { (context / 2).max(1) }.min(len);
            feed = ids.narrow(1, len - keep, keep)?;
        }
        let logits = self.model.extend(&feed)?;
        self.ids = Some(ids);
        let t = logits.dim(1)?;
        Ok(logits.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?)
    }
}

/// A llama and its key/value cache.
pub struct LlamaCache<'a> {
    model: &'a crate::models::llama::Llama,
    cache: crate::models::llama::model::KvCache,
}

impl KvModel for LlamaCache<'_> {
    fn cached(&self) -> Result<usize> {
        Ok(self.cache.pos())
    }
    fn reset(&mut self) {
        self.cache = self.model.new_cache();
    }
    fn extend(&mut self, ids: &Tensor) -> Result<Tensor> {
        self.model.forward_cached(ids, &mut self.cache)
    }
    fn context(&self) -> usize {
        retort_core::Model::context_len(self.model)
    }
}

/// Refuses what cannot be sampled: no prompt, prompts of different lengths, an empty one, a
/// nucleus outside (0, 1].
fn check(prompts: &[Vec<u32>], s: &Sampling) -> Result<()> {
    let Some(first) = prompts.first() else {
        return Err(Error::input("prompt", "no prompt to continue"));
    };
    if first.is_empty() {
        return Err(Error::input("prompt", "is empty after tokenization"));
    }
    if let Some(other) = prompts.iter().find(|p| p.len() != first.len()) {
        return Err(Error::input(
            "prompt",
            format!(
                "prompts decoded together must have one length: {} and {} tokens",
                first.len(),
                other.len()
            ),
        ));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::input(
            "--top-p",
            format!("expected a number in (0, 1], got {}", s.top_p),
        ));
    }
    Ok(())
}

/// Extends each of `prompts` (one length) by up to `s.max_tokens` tokens, each sequence
/// stopping after `eos`. Returns the generated ids of each (without its prompt).
pub fn sample_batch(
    decoder: &mut dyn Decoder,
    prompts: &[Vec<u32>],
    eos: Option<u32>,
    s: &Sampling,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    check(prompts, s)?;
    let b = prompts.len();
    let mut rngs: Vec<ChaCha8Rng> = (0..b as u64)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
            rng.set_stream(i);
            rng
        })
        .collect();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut new = Tensor::from_vec(prompts.concat(), (b, prompts[0].len()), device)?;
    for _ in 0..s.max_tokens {
        let logits: Vec<Vec<f32>> = decoder.next_logits(&new)?.to_dtype(DType::F32)?.to_vec2()?;
        // Each sequence draws from its own generator: the picks run in parallel.
        let picks: Vec<Option<u32>> = logits
            .par_iter()
            .zip(rngs.par_iter_mut())
            .zip(done.par_iter())
            .map(|((row, rng), &d)| (!d).then(|| pick(row, s, rng) as u32))
            .collect();
        let mut next = Vec::with_capacity(b);
        for (i, id) in picks.into_iter().enumerate() {
            let Some(id) = id else {
                next.push(eos.unwrap_or(0));
                continue;
            };
            out[i].push(id);
            done[i] = Some(id) == eos;
            next.push(id);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        new = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok(out)
}

/// [`sample_batch`] of one prompt with any model through [`WindowDecoder`].
pub fn generate(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    prompt: &[u32],
    context: usize,
    eos: Option<u32>,
    s: &Sampling,
    device: &Device,
) -> Result<Vec<u32>> {
    let mut decoder = WindowDecoder::new(forward, context);
    Ok(sample_batch(&mut decoder, &[prompt.to_vec()], eos, s, device)?.remove(0))
}

/// [`sample_batch`] of one prompt with a llama through its [`LlamaDecoder`].
pub fn generate_cached(
    model: &crate::models::llama::Llama,
    prompt: &[u32],
    eos: Option<u32>,
    s: &Sampling,
    device: &Device,
) -> Result<Vec<u32>> {
    let mut decoder = LlamaDecoder::new(model);
    Ok(sample_batch(&mut decoder, &[prompt.to_vec()], eos, s, device)?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_restricts_the_support() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        assert_eq!(pick(&logits, &Sampling::default(), &mut rng), 1);
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Sampling::default()
        };
        // p = [0.02, 0.47, 0.06, 0.44]: the nucleus of 0.5 is {1, 3}.
        for _ in 0..200 {
            let i = pick(&logits, &s, &mut rng);
            assert!(i == 1 || i == 3, "{i}");
        }
    }

    #[test]
    fn cached_generation_matches_recomputing_the_window() {
        use retort_core::{Model, TapSet};
        let m = crate::testing::llama(
            serde_json::json!({"n_layer": 2, "n_embd": 16, "n_head": 4, "n_kv_head": 2, "context": 12,
                               "vocab_size": 20, "init_std": 0.5}),
            9,
        )
        .expect("model")
        .frozen();
        for s in [
            Sampling {
                max_tokens: 9,
                ..Sampling::default()
            },
            Sampling {
                max_tokens: 30,
                temperature: 0.9,
                top_p: 0.8,
                seed: 4,
                ..Sampling::default()
            },
        ] {
            let f = |x: &Tensor| Ok(m.forward_ids(x, &TapSet::none())?.logits);
            let plain = generate(&f, &[3, 1, 4], m.context_len(), None, &s, &Device::Cpu).expect("plain");
            let cached = generate_cached(&m, &[3, 1, 4], None, &s, &Device::Cpu).expect("cached");
            assert_eq!(cached.len(), s.max_tokens);
            // Identical while the window fits the context (12 - 3 prompt tokens = 9).
            assert_eq!(&cached[..9], &plain[..9], "{s:?}");
        }
    }

    #[test]
    fn generation_stops_at_eos_and_respects_max_tokens() {
        // A "model" whose next token is always (last id + 1) mod 5.
        let f = |ids: &Tensor| -> Result<Tensor> {
            let v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let mut rows = Vec::new();
            for &x in &v {
                let mut r = vec![0f32; 5];
                r[((x + 1) % 5) as usize] = 10.0;
                rows.extend(r);
            }
            Ok(Tensor::from_vec(rows, (1, v.len(), 5), &Device::Cpu)?)
        };
        let s = Sampling {
            max_tokens: 10,
            ..Sampling::default()
        };
        let out = generate(&f, &[1], 4, Some(4), &s, &Device::Cpu).expect("gen");
        assert_eq!(out, vec![2, 3, 4]);
        let out = generate(&f, &[1], 4, None, &Sampling { max_tokens: 6, ..s }, &Device::Cpu).expect("gen");
        assert_eq!(out, vec![2, 3, 4, 0, 1, 2]);
    }

    /// A tiny frozen llama for the batch tests.
    fn tiny_llama() -> crate::models::llama::Llama {
        crate::testing::llama(
            serde_json::json!({"n_layer": 2, "n_embd": 16, "n_head": 4, "n_kv_head": 2, "context": 12,
                               "vocab_size": 20, "init_std": 0.5}),
            9,
        )
        .expect("model")
        .frozen()
    }

    #[test]
    fn a_sequence_samples_the_same_tokens_whatever_else_is_in_its_batch() {
        use retort_core::{Model, TapSet};
        let m = tiny_llama();
        let prompts = vec![vec![3, 1, 4], vec![1, 5, 9], vec![2, 6, 5], vec![3, 5, 8]];
        let sampled = Sampling {
            max_tokens: 16,
            temperature: 0.9,
            top_p: 0.9,
            top_k: 6,
            seed: 7,
        };
        for s in [
            Sampling {
                max_tokens: 16,
                ..Sampling::default()
            },
            sampled,
        ] {
            let all = sample_batch(&mut LlamaDecoder::new(&m), &prompts, None, &s, &Device::Cpu).expect("batch");
            for i in 0..prompts.len() {
                let fewer =
                    sample_batch(&mut LlamaDecoder::new(&m), &prompts[..=i], None, &s, &Device::Cpu).expect("fewer");
                assert_eq!(fewer[i], all[i], "sequence {i} depends on its batch ({s:?})");
            }
            let f = |x: &Tensor| Ok(m.forward_ids(x, &TapSet::none())?.logits);
            let window = sample_batch(
                &mut WindowDecoder::new(&f, m.context_len()),
                &prompts,
                None,
                &s,
                &Device::Cpu,
            )
            .expect("window");
            // Identical while the window fits the context (12 - 3 prompt tokens = 9).
            for (w, c) in window.iter().zip(&all) {
                assert_eq!(&w[..9], &c[..9], "{s:?}");
            }
            assert_ne!(all[0], all[1], "different prompts, different continuations");
        }
    }

    #[test]
    fn each_sequence_stops_at_its_own_eos() {
        // A "model" whose next token is always (last id + 1) mod 5.
        let f = |ids: &Tensor| -> Result<Tensor> {
            let (b, t) = ids.dims2()?;
            let v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let rows: Vec<f32> = v
                .iter()
                .flat_map(|&x| (0..5).map(move |j| if j == (x + 1) % 5 { 10.0 } else { 0.0 }))
                .collect();
            Ok(Tensor::from_vec(rows, (b, t, 5), &Device::Cpu)?)
        };
        let s = Sampling {
            max_tokens: 10,
            ..Sampling::default()
        };
        let out = sample_batch(
            &mut WindowDecoder::new(&f, 4),
            &[vec![1], vec![3], vec![0]],
            Some(4),
            &s,
            &Device::Cpu,
        )
        .expect("gen");
        assert_eq!(out, vec![vec![2, 3, 4], vec![4], vec![1, 2, 3, 4]]);
        let err = sample_batch(
            &mut WindowDecoder::new(&f, 4),
            &[vec![1], vec![1, 2]],
            None,
            &s,
            &Device::Cpu,
        )
        .expect_err("two lengths");
        assert!(err.to_string().contains("one length"), "{err}");
    }

    #[test]
    fn top_k_restricts_the_support() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let logits = [0.0f32, 3.0, 1.0, 2.9, 2.8];
        let s = Sampling {
            temperature: 5.0,
            top_k: 2,
            ..Sampling::default()
        };
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[pick(&logits, &s, &mut rng)] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 0 && seen[3] > 0, "{seen:?}");
        let one = Sampling { top_k: 1, ..s };
        assert!((0..50).all(|_| pick(&logits, &one, &mut rng) == 1));
    }
}
