//! SmolLM2-135M-Instruct with every weight dequantized to f32 (`CANDLE_DEQUANTIZE_ALL=1`, which
//! candle reads once per thread when a `QMatMul` is built), in retort's GGUF teacher, in
//! retort's dense model rebuilt from the GGUF in Hugging Face layout (q/k rows un-permuted,
//! `rotate_half` RoPE), and in candle-transformers' `quantized_llama`. The same f32 weights, so
//! the logits must agree to float rounding. Own test binary: the environment variable must not
//! reach the quantized comparison in `smollm2_reference.rs`. Skipped when the file is absent.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use retort_core::{Params, TapSet, Tokenizer};
use retort_plugins::models::llama::model::{Llama, Part};
use retort_plugins::models::llama::Source;
use retort_plugins::tokenizers::hf::HfTokenizer;

#[test]
fn dequantized_smollm2_matches_candle_transformers_to_float_rounding() {
    let path = std::env::var_os("RETORT_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !path.is_file() {
        eprintln!(
            "SKIPPED: {} is absent (run scripts/fetch_smollm2.sh or set RETORT_SMOLLM2_GGUF)",
            path.display()
        );
        return;
    }
    // SAFETY-free in edition 2021: set before any QMatMul of this thread is built.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let registry = retort_core::Registry::empty();
    let ctx = retort_core::BuildContext::new(&registry, Device::Cpu, 0);
    let params = Params::new(
        "teacher",
        serde_json::json!({"checkpoint": path, "context": 512})
            .as_object()
            .expect("o")
            .clone(),
    );
    let gguf_teacher = retort_plugins::teachers::llama::load_frozen(&params, &ctx).expect("teacher");
    let (mut cfg, weights) = Source::Gguf(path.clone()).dense_weights(&Device::Cpu).expect("dense");
    cfg.context = 512;
    let parts = weights.into_iter().map(|(n, t)| (n, Part::Dense(t))).collect();
    let hf_layout = Llama::from_parts(cfg, parts, false, &Device::Cpu, "dense").expect("dense model");

    let tok = HfTokenizer::from_path(&path).expect("tokenizer");
    let ids = tok.encode("The capital of France is").expect("encode");
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .expect("ids")
        .unsqueeze(0)
        .expect("u");
    let last = |m: &Llama| -> Vec<f32> {
        let l = m.forward_ids(&x, &TapSet::none()).expect("forward").logits;
        l.get(0)
            .expect("g")
            .get(ids.len() - 1)
            .expect("g")
            .to_vec1()
            .expect("v")
    };
    let mut file = std::fs::File::open(&path).expect("open");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let mut reference =
        candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            .expect("candle-transformers");
    let want: Vec<f32> = reference
        .forward(&x, 0)
        .expect("forward")
        .squeeze(0)
        .expect("s")
        .to_vec1()
        .expect("v");
    let diff = |a: &[f32]| a.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let (d_gguf, d_hf) = (diff(&last(&gguf_teacher)), diff(&last(&hf_layout)));
    println!(
        "dequantized SmolLM2, prompt {ids:?}: max |logit difference| vs candle-transformers: \
         GGUF teacher (interleaved RoPE) {d_gguf:.3e}, Hugging Face layout (un-permuted q/k, rotate_half) {d_hf:.3e}"
    );
    assert!(d_gguf < 1e-3 && d_hf < 1e-3, "{d_gguf} {d_hf}");
}
