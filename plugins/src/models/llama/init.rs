//! Fresh weights for a llama: every parameter of [`param_specs`] drawn from its [`Init`] with a
//! seeded ChaCha8 stream, in checkpoint order.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use retort_core::{Error, Result};

use super::config::LlamaConfig;
use super::model::{param_specs, Init, Llama, Part};

/// Every parameter of `cfg`, freshly drawn: `Normal(0, std)`, zeros or ones as [`param_specs`]
/// says, one f32 stream seeded with `seed` in checkpoint order (drawn on the host and copied
/// to `device`, so CPU and GPU runs start from the same weights).
pub fn init_parts(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<HashMap<String, Part>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut parts = HashMap::new();
    for (name, shape, init) in param_specs(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::Normal(std) => {
                let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::failed("weight init", e))?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            }
        };
        parts.insert(name, Part::Dense(Tensor::from_vec(data, shape, device)?));
    }
    Ok(parts)
}

impl Llama {
    /// A freshly initialised trainable model ([`init_parts`]); the init depends only on `seed`.
    pub fn init(cfg: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let parts = init_parts(&cfg, seed, device)?;
        Self::from_parts(cfg, parts, true, device, "fresh")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::test_support::tiny_cfg;

    #[test]
    fn init_depends_only_on_the_seed_and_follows_the_specs() {
        let cfg = tiny_cfg(serde_json::json!({"qkv_bias": true}));
        let (a, b) = (
            Llama::init(cfg.clone(), 3, &Device::Cpu).expect("a"),
            Llama::init(cfg.clone(), 3, &Device::Cpu).expect("b"),
        );
        let c = Llama::init(cfg.clone(), 4, &Device::Cpu).expect("c");
        let names: Vec<&String> = a.vars().iter().map(|(n, _)| n).collect();
        assert_eq!(names, param_specs(&cfg).iter().map(|(n, _, _)| n).collect::<Vec<_>>());
        let values = |m: &Llama, i: usize| -> Vec<f32> {
            m.vars()[i]
                .1
                .as_tensor()
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v")
        };
        for (i, (name, _, init)) in param_specs(&cfg).into_iter().enumerate() {
            assert_eq!(values(&a, i), values(&b, i), "{name}");
            match init {
                Init::Ones => assert!(values(&a, i).iter().all(|x| *x == 1.0), "{name}"),
                Init::Zeros => assert!(values(&a, i).iter().all(|x| *x == 0.0), "{name}"),
                Init::Normal(_) => assert_ne!(values(&a, i), values(&c, i), "{name}"),
            }
        }
    }
}
