//! The Hugging Face layout against candle-transformers' `models::llama` (an independent
//! implementation of `LlamaForCausalLM`): a random llama saved by retort as a Hugging Face
//! directory is loaded by candle-transformers from the same `config.json` and
//! `model.safetensors`; last-position logits must agree to float rounding. No download.

use candle_core::{DType, Device, Tensor};
use retort_core::{Student, TapSet};
use retort_plugins::testing::llama;

fn check(extra: serde_json::Value) {
    let mut params = serde_json::json!({"n_layer": 3, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate": 96,
                                        "context": 32, "vocab_size": 300, "init_std": 0.1, "rope_theta": 5000.0});
    for (k, v) in extra.as_object().expect("o") {
        params[k] = v.clone();
    }
    let m = llama(params, 11).expect("model");
    let dir = tempfile::tempdir().expect("tmp");
    m.save(dir.path()).expect("save");
    let text = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let ref_cfg: candle_transformers::models::llama::LlamaConfig = serde_json::from_str(&text).expect("their config");
    let ref_cfg = ref_cfg.into_config(false);
    let tensors = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).expect("load");
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let reference = candle_transformers::models::llama::Llama::load(vb, &ref_cfg).expect("their model");
    let mut cache =
        candle_transformers::models::llama::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu).expect("cache");
    let x = Tensor::new(&[[3u32, 250, 17, 99, 0, 42, 7]], &Device::Cpu).expect("ids");
    let want: Vec<f32> = reference
        .forward(&x, 0, &mut cache)
        .expect("fwd")
        .squeeze(0)
        .expect("s")
        .to_vec1()
        .expect("v");
    let ours = m.forward_ids(&x, &TapSet::none()).expect("fwd").logits;
    let got: Vec<f32> = ours.get(0).expect("g").get(6).expect("g").to_vec1().expect("v");
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{extra}: max |logit difference| vs candle-transformers llama = {d:.3e}");
    assert!(d < 1e-4, "{extra}: {d}");
}

#[test]
fn hf_export_matches_candle_transformers_llama_tied_and_untied() {
    check(serde_json::json!({}));
    check(serde_json::json!({"tie_embeddings": false, "n_kv_head": 1}));
}
