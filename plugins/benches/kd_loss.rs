//! KD loss forward + backward at LLM scale (N = 2048 tokens, V = 50,257): dense `kl` (T = 2)
//! and `topk_kl` (k = 64, sparse teacher as from a logit cache), both through the built-in
//! terms (fused kernels). Throughput is the bytes of logits the step must read at least once
//! (student and teacher, or student only for top-k), to compare with the `bandwidth` bench;
//! `kl_dense_kernels_only` times the fused forward and backward sweeps without candle's
//! autograd and counts the five matrices they move.
//!
//! `cargo bench -p retort-plugins --bench kd_loss`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

/// The allocator of the `retort` binary (retort-host's default): it keeps freed blocks for
/// reuse, where glibc's malloc maps every ~412 MB buffer afresh and the kernel zeroes its pages
/// on each iteration (which then dominates the time).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::registry::Factory;
use retort_core::{Batch, BuildContext, LossTerm, Outputs, Params, Progress, Registry, StepContext};
use retort_plugins::kernels::divergence::{per_token_and_grad, Divergence};

const N: usize = 2048;
const V: usize = 50_257;
const K: usize = 64;

fn term(kind: &str, params: serde_json::Value) -> Result<Box<dyn LossTerm>> {
    retort_plugins::link();
    let mut reg = Registry::empty();
    for f in retort_core::inventory::iter::<Factory<dyn retort_core::Schedule>> {
        reg.schedules.register(f, "built-in")?;
    }
    let mut ctx = BuildContext::new(&reg, Device::Cpu, 0);
    ctx.vocab_size = Some(V);
    let f = retort_core::inventory::iter::<Factory<dyn LossTerm>>
        .into_iter()
        .find(|f| f.kind == kind)
        .context("kind")?;
    Ok((f.build)(
        &Params::new("loss[0]", params.as_object().context("object")?.clone()),
        &ctx,
    )?)
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-3.0..3.0)).collect()
}

fn step(term: &dyn LossTerm, student: &Var, teacher: &Outputs, batch: &Batch) -> Result<f32> {
    let s = Outputs::logits_only(student.as_tensor().clone());
    let ctx = StepContext {
        batch,
        student: &s,
        teacher: Some(teacher),
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let loss = term.compute(&ctx)?;
    let grads = loss.backward()?;
    grads.get(student.as_tensor()).context("gradient")?;
    Ok(loss.to_scalar::<f32>()?)
}

fn bench(c: &mut Criterion) {
    let mut run = || -> Result<()> {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let student = Var::from_tensor(&Tensor::from_vec(random(&mut rng, N * V), (1, N, V), &dev)?)?;
        let ids = Tensor::zeros((1, N), DType::U32, &dev)?;
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let mut g = c.benchmark_group("kd_loss_fwd_bwd_N2048_V50257");
        g.sample_size(10);

        let dense = Outputs::logits_only(Tensor::from_vec(random(&mut rng, N * V), (1, N, V), &dev)?);
        let kl = term("kl", serde_json::json!({"temperature": 2.0}))?;
        g.throughput(Throughput::Bytes((2 * N * V * 4) as u64));
        g.bench_function("kl_dense_fused", |b| {
            b.iter(|| step(kl.as_ref(), &student, &dense, &batch).expect("kl step"))
        });
        // The two fused sweeps alone (no autograd): forward reads both matrices, backward reads
        // both and writes the gradient, so 5 matrices' bytes move.
        let w = Tensor::full(1.0 / N as f32, (1, N), &dev)?;
        g.throughput(Throughput::Bytes((5 * N * V * 4) as u64));
        g.bench_function("kl_dense_kernels_only", |b| {
            b.iter(|| {
                per_token_and_grad(student.as_tensor(), &dense.logits, 2.0, Divergence::Forward, &w)
                    .expect("kl kernels")
            })
        });
        drop(dense);

        let tid: Vec<u32> = (0..N)
            .flat_map(|i| (0..K).map(move |j| ((i * 7919 + j * 104_729) % V) as u32))
            .collect();
        let z: f32 = (0..K).map(|j| (-0.1 * j as f32).exp()).sum();
        let lp: Vec<f32> = (0..N)
            .flat_map(|_| (0..K).map(move |j| (0.9 * (-0.1 * j as f32).exp() / z).ln()))
            .collect();
        let mut sparse = Outputs::logits_only(Tensor::zeros((1, 1, 1), DType::F32, &dev)?);
        sparse
            .taps
            .insert(format!("topk.{K}.ids"), Tensor::from_vec(tid, (1, N, K), &dev)?);
        sparse
            .taps
            .insert(format!("topk.{K}.logprobs"), Tensor::from_vec(lp, (1, N, K), &dev)?);
        let topk = term("topk_kl", serde_json::json!({ "k": K }))?;
        g.throughput(Throughput::Bytes((N * V * 4) as u64));
        g.bench_function("topk_kl_k64_bucket_fused", |b| {
            b.iter(|| step(topk.as_ref(), &student, &sparse, &batch).expect("topk step"))
        });
        g.finish();
        Ok(())
    };
    if let Err(e) = run() {
        panic!("kd_loss bench: {e:#}");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
