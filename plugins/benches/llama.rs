//! Llama-family models on the CPU: a frozen teacher's forward pass at SmolLM2-135M's shape
//! (30 layers, width 576, 9 query / 3 key-value heads, MLP 1536, vocabulary 49,152; random
//! weights, f32) over one 128-token window, and a small llama student's training step
//! (forward, a scalar of its logits, backward: the fused linear, attention, RMSNorm and SwiGLU
//! kernels with their backward) over 8 x 128 tokens.
//!
//! `cargo bench -p retort-plugins --bench llama`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::{Batch, Model, Params, TapSet};
use retort_plugins::models::llama::{Llama, LlamaConfig, LlamaParams};

fn config(v: serde_json::Value) -> Result<LlamaConfig> {
    let params = Params::new("bench", v.as_object().context("object")?.clone());
    let p: LlamaParams = params.parse()?;
    Ok(LlamaConfig::resolve(&p, &params, None, None)?)
}

fn batch(b: usize, t: usize, vocab: usize, seed: u64) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..vocab as u32)).collect();
    let all = Tensor::from_vec(ids, (b, t + 1), &Device::Cpu)?;
    Ok(Batch {
        input_ids: all.narrow(1, 0, t)?.contiguous()?,
        targets: all.narrow(1, 1, t)?.contiguous()?,
        mask: None,
        source: None,
    })
}

fn bench(c: &mut Criterion) {
    let none = TapSet::none();
    let teacher_cfg = config(serde_json::json!({
        "n_layer": 30, "n_embd": 576, "n_head": 9, "n_kv_head": 3, "intermediate": 1536,
        "context": 2048, "vocab_size": 49152, "rope_theta": 100000.0, "tie_embeddings": true
    }))
    .expect("teacher config");
    let teacher = Llama::init(teacher_cfg, 1, &Device::Cpu).expect("teacher").frozen();
    let tb = batch(1, 128, 49_152, 2).expect("batch");
    let mut g = c.benchmark_group("llama_teacher_forward");
    g.sample_size(10);
    g.throughput(Throughput::Elements(128));
    g.bench_function("smollm2_135m_shape_1x128_tokens", |b| {
        b.iter(|| {
            teacher
                .forward(&tb, &none)
                .and_then(|o| Ok(o.logits.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?))
                .expect("forward")
        })
    });
    g.finish();

    let student_cfg = config(serde_json::json!({
        "n_layer": 4, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "intermediate": 688,
        "context": 128, "vocab_size": 4096, "rope_theta": 10000.0
    }))
    .expect("student config");
    let student = Llama::init(student_cfg, 3, &Device::Cpu).expect("student");
    let sb = batch(8, 128, 4096, 4).expect("batch");
    let mut g = c.benchmark_group("llama_student_train_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements(8 * 128));
    g.bench_function("4L_256_8x128_tokens", |b| {
        b.iter(|| {
            let out = student.forward(&sb, &none).expect("forward");
            let loss = out.logits.sqr().and_then(|l| l.mean_all()).expect("loss");
            loss.backward().expect("backward")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
