//! Autoregressive sampling from any model's next-token logits: greedy at temperature 0, else
//! softmax at temperature `T` restricted to the smallest top-p nucleus, drawn from a seeded
//! ChaCha8 stream. [`generate`] works with any model and re-runs the window every step;
//! [`generate_cached`] decodes a llama incrementally with a key/value cache.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    /// Seed of the sampling stream.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: 32,
            temperature: 0.0,
            top_p: 1.0,
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
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut p: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / s.temperature).exp()))
        .collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, q) in &p {
        kept += 1;
        mass += q;
        if mass >= s.top_p {
            break;
        }
    }
    let u = rng.random::<f64>() * mass;
    let mut acc = 0.0;
    for (i, q) in &p[..kept] {
        acc += q;
        if acc >= u {
            return *i;
        }
    }
    p[kept - 1].0
}

/// Extends `prompt` by up to `s.max_tokens` tokens, stopping after `eos`. `forward` maps ids
/// `[1, seq]` to logits `[1, seq, vocab]`; windows longer than `context` keep their last
/// `context` tokens. Returns the generated ids (without the prompt).
pub fn generate(
    forward: &dyn Fn(&Tensor) -> Result<Tensor>,
    prompt: &[u32],
    context: usize,
    eos: Option<u32>,
    s: &Sampling,
    device: &Device,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::input("prompt", "is empty after tokenization"));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::input(
            "--top-p",
            format!("expected a number in (0, 1], got {}", s.top_p),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..s.max_tokens {
        let start = ids.len().saturating_sub(context);
        let window = Tensor::new(&ids[start..], device)?.unsqueeze(0)?;
        let logits = forward(&window)?;
        let t = logits.dim(1)?;
        let last: Vec<f32> = logits.get(0)?.get(t - 1)?.to_dtype(DType::F32)?.to_vec1()?;
        let next = pick(&last, s, &mut rng) as u32;
        ids.push(next);
        out.push(next);
        if Some(next) == eos {
            break;
        }
    }
    Ok(out)
}

/// [`generate`] for a llama with a key/value cache: the prompt is run once, then one token per
/// step. When the cache reaches the context, decoding restarts from the last half-context
/// of tokens.
pub fn generate_cached(
    model: &crate::models::llama::Llama,
    prompt: &[u32],
    eos: Option<u32>,
    s: &Sampling,
    device: &Device,
) -> Result<Vec<u32>> {
    use retort_core::Model;
    if prompt.is_empty() {
        return Err(Error::input("prompt", "is empty after tokenization"));
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return Err(Error::input(
            "--top-p",
            format!("expected a number in (0, 1], got {}", s.top_p),
        ));
    }
    let context = model.context_len();
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut ids = prompt.to_vec();
    let mut pending: Vec<u32> = prompt[prompt.len().saturating_sub(context)..].to_vec();
    let mut cache = model.new_cache();
    let mut out = Vec::new();
    for _ in 0..s.max_tokens {
        if cache.pos() + pending.len() > context {
            cache = model.new_cache();
            let keep = (context / 2).max(1);
            pending = ids[ids.len().saturating_sub(keep)..].to_vec();
        }
        let x = Tensor::new(pending.as_slice(), device)?.unsqueeze(0)?;
        let logits = model.forward_cached(&x, &mut cache)?;
        let t = logits.dim(1)?;
        let last: Vec<f32> = logits.get(0)?.get(t - 1)?.to_dtype(DType::F32)?.to_vec1()?;
        let next = pick(&last, s, &mut rng) as u32;
        ids.push(next);
        out.push(next);
        pending = vec![next];
        if Some(next) == eos {
            break;
        }
    }
    Ok(out)
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
}
