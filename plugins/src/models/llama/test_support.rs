//! Fixtures shared by the llama module's tests: a tiny model (vocab 11) with perturbed norms,
//! a batch for it, and the largest absolute difference of two tensors.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use retort_core::{Batch, Params};

use super::{Llama, LlamaConfig, LlamaParams};

/// A tiny config from JSON params (vocab 11).
pub(crate) fn tiny_cfg(extra: serde_json::Value) -> LlamaConfig {
    let mut v = serde_json::json!({"n_layer": 2, "n_embd": 8, "n_head": 4, "n_kv_head": 2, "intermediate": 12,
                                   "context": 16, "vocab_size": 11, "init_std": 0.3, "rope_theta": 100.0});
    for (k, x) in extra.as_object().expect("object") {
        v[k] = x.clone();
    }
    let params = Params::new("student", v.as_object().expect("object").clone());
    let p: LlamaParams = params.parse().expect("parse");
    LlamaConfig::resolve(&p, &params, None, None).expect("resolve")
}

/// A trainable [`tiny_cfg`] model (seed 7) whose norm weights and biases are perturbed.
pub(crate) fn tiny(extra: serde_json::Value) -> Llama {
    let mut m = Llama::init(tiny_cfg(extra), 7, &Device::Cpu).expect("init");
    // Norm weights and biases start at 1 and 0; perturb them so every gradient path is generic.
    // Seeded (candle's `randn_like` is not): with random noise the MoE router of the tiny
    // model now and then never picked one expert, and that expert got no gradient.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let normal = Normal::new(0.0f32, 0.2).expect("normal");
    for (n, v) in &m.vars {
        if !n.ends_with("proj.weight") && !n.contains("embed") && !n.contains("lm_head") && !n.contains("moe") {
            let noise: Vec<f32> = (0..v.elem_count()).map(|_| normal.sample(&mut rng)).collect();
            let noise = Tensor::from_vec(noise, v.dims(), v.device())
                .and_then(|t| t.to_dtype(v.dtype()))
                .and_then(|t| t + v.as_tensor())
                .expect("noise");
            v.set(&noise).expect("set");
        }
    }
    m.source = "test".into();
    m
}

/// Two rows of `t` token ids (and targets) below 11.
pub(crate) fn batch(t: usize) -> Batch {
    let ids: Vec<u32> = (0..2 * t).map(|i| ((i * 5 + 3) % 11) as u32).collect();
    let tg: Vec<u32> = (0..2 * t).map(|i| ((i * 3 + 1) % 11) as u32).collect();
    Batch {
        input_ids: Tensor::from_vec(ids, (2, t), &Device::Cpu).expect("ids"),
        targets: Tensor::from_vec(tg, (2, t), &Device::Cpu).expect("tg"),
        mask: None,
        source: None,
    }
}

/// `max |a - b|` (f32 tensors).
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("d")
        .abs()
        .expect("a")
        .max_all()
        .expect("m")
        .to_scalar::<f32>()
        .expect("s")
}
