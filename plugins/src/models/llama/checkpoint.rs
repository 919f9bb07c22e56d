//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; written back as `config.json`, `model.safetensors` and
//! `generation_config.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use retort_core::{fsutil, Error, Result};

use super::config::LlamaConfig;
use super::model::{Llama, Part};

/// Single-file weights.
pub const SAFETENSORS: &str = "model.safetensors";
/// Index of sharded weights.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Every tensor of the directory's safetensors (one file or all shards of the index).
pub fn load_safetensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let what = || format!("checkpoint {}", dir.display());
    let single = dir.join(SAFETENSORS);
    let index = dir.join(SAFETENSORS_INDEX);
    let files: Vec<std::path::PathBuf> = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| Error::io("reading the safetensors index", &index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::input_failed(what(), format!("{} is not JSON", index.display()), e))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::input(what(), format!("{} has no `weight_map`", index.display())))?;
        let shards: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else {
        return Err(Error::input(
            what(),
            format!("neither {SAFETENSORS} nor {SAFETENSORS_INDEX} is there"),
        ));
    };
    let mut all = HashMap::new();
    for f in files {
        let t = crate::formats::safetensors::load(&f, device, &what())?;
        all.extend(t);
    }
    Ok(all)
}

/// Loads a llama-family model from a Hugging Face directory with architecture `cfg`
/// (usually [`LlamaConfig::read_hf_dir`] of the same directory).
pub fn load_hf(cfg: LlamaConfig, dir: &Path, trainable: bool, device: &Device) -> Result<Llama> {
    let tensors = load_safetensors(dir, device)?;
    let parts = tensors.into_iter().map(|(n, t)| (n, Part::Dense(t))).collect();
    Llama::from_parts(cfg, parts, trainable, device, &format!("from {}", dir.display()))
}

/// Writes `model` into `dir` in Hugging Face layout: `config.json` (`LlamaForCausalLM`),
/// `model.safetensors` (Hugging Face names, tied head omitted) and `generation_config.json`.
/// Each file is written atomically.
pub fn save_hf(model: &Llama, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating model directory", dir, e))?;
    let map: HashMap<String, Tensor> = model
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    if map.is_empty() {
        return Err(Error::Runtime("a frozen model has no trainable weights to save".into()));
    }
    let file = dir.join(SAFETENSORS);
    let temp = fsutil::temp_path(&file);
    candle_core::safetensors::save(&map, &temp)?;
    fsutil::commit_temp(&temp, &file)?;
    // The dtype of the tensors written (mixed precision keeps f32 master weights).
    let mut config = model.config().clone();
    config.dtype = model.precision().1;
    let json =
        serde_json::to_vec_pretty(&config.to_hf_json()).map_err(|e| Error::failed("serialising config.json", e))?;
    fsutil::write_atomic(&dir.join("config.json"), &json)?;
    let gen = serde_json::json!({"_from_model_config": true, "do_sample": false});
    let gen = serde_json::to_vec_pretty(&gen).map_err(|e| Error::failed("serialising generation_config.json", e))?;
    fsutil::write_atomic(&dir.join("generation_config.json"), &gen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::test_support::{batch, max_diff, tiny};
    use retort_core::{Model, Params, Student, TapSet};

    #[test]
    fn hf_export_loads_back_with_identical_logits() {
        for extra in [
            serde_json::json!({}),
            serde_json::json!({"tie_embeddings": false, "qkv_bias": true}),
            serde_json::json!({"n_experts": 2}),
        ] {
            let m = tiny(extra.clone());
            let dir = tempfile::tempdir().expect("tmp");
            m.save(dir.path()).expect("save");
            let cfg_json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("read")).expect("json");
            assert!(dir.path().join("generation_config.json").is_file());
            let names = candle_core::safetensors::load(dir.path().join(SAFETENSORS), &Device::Cpu).expect("load");
            assert!(names.contains_key("model.layers.1.input_layernorm.weight"));
            assert_eq!(
                names.contains_key("lm_head.weight"),
                extra.get("tie_embeddings").is_some()
            );
            let params = Params::new(
                "teacher",
                serde_json::json!({"checkpoint": dir.path()})
                    .as_object()
                    .expect("o")
                    .clone(),
            );
            let p: crate::models::llama::LlamaParams = params.parse().expect("p");
            let ck = LlamaConfig::read_hf_dir(dir.path(), "checkpoint").expect("cfg");
            let cfg = LlamaConfig::resolve(&p, &params, Some(&ck), None).expect("resolve");
            assert_eq!(&cfg, m.config(), "{cfg_json}");
            let back = load_hf(cfg, dir.path(), false, &Device::Cpu).expect("load");
            let b = batch(5);
            let d = max_diff(
                &m.forward(&b, &TapSet::none()).expect("f").logits,
                &back.forward(&b, &TapSet::none()).expect("f").logits,
            );
            assert_eq!(d, 0.0, "{extra}");
        }
    }

    #[test]
    fn sharded_checkpoints_load() {
        let m = tiny(serde_json::json!({}));
        let dir = tempfile::tempdir().expect("tmp");
        m.save(dir.path()).expect("save");
        // Split model.safetensors into two shards with an index.
        let all = candle_core::safetensors::load(dir.path().join(SAFETENSORS), &Device::Cpu).expect("load");
        let (mut a, mut b) = (HashMap::new(), HashMap::new());
        let mut map = serde_json::Map::new();
        for (i, (n, t)) in all.into_iter().enumerate() {
            let shard = if i % 2 == 0 {
                "model-00001-of-00002.safetensors"
            } else {
                "model-00002-of-00002.safetensors"
            };
            map.insert(n.clone(), shard.into());
            if i % 2 == 0 {
                a.insert(n, t);
            } else {
                b.insert(n, t);
            }
        }
        candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors")).expect("s");
        candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors")).expect("s");
        std::fs::remove_file(dir.path().join(SAFETENSORS)).expect("rm");
        std::fs::write(
            dir.path().join(SAFETENSORS_INDEX),
            serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
        )
        .expect("w");
        let back = load_hf(m.config().clone(), dir.path(), true, &Device::Cpu).expect("load");
        let bt = batch(4);
        let d = max_diff(
            &m.forward(&bt, &TapSet::none()).expect("f").logits,
            &back.forward(&bt, &TapSet::none()).expect("f").logits,
        );
        assert_eq!(d, 0.0);
        let err = load_hf(
            m.config().clone(),
            tempfile::tempdir().expect("t").path(),
            true,
            &Device::Cpu,
        )
        .err()
        .expect("missing");
        assert_eq!(err.exit_code(), 2, "{err}");
    }
}
