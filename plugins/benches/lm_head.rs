//! The loss region of a KD step fused with the LM head or not (`kernels::lm_head`):
//! `0.7 kl(T = 2) + 0.3 ce` from the student's head input `[N, H]` and weight `[V, H]` and the
//! teacher's, forward and backward to the student's `dL/dh` and `dL/dW`, at SmolLM2's width and
//! vocabulary (H = 576, V = 49,152) and N = 1,024 tokens. Throughput is the step's tokens.
//! Peak memory is not measured here: `examples/lm_head_memory.rs` does, one configuration per
//! process (`scripts/bench_lm_head.sh`).
//!
//! `cargo bench -p retort-plugins --bench lm_head`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

/// The allocator of the `retort` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::taps::{LM_HEAD_HIDDEN, LM_HEAD_WEIGHT};
use retort_core::{Batch, LossTerm, Outputs, Progress, StepContext};
use retort_plugins::kernels::lm_head::{chunk_tokens, fused_loss, HeadTerm, WeightGradient};
use retort_plugins::models::nn::matmul;

const N: usize = 1024;
const H: usize = 576;
const V: usize = 49_152;

struct Fixture {
    hidden: Var,
    weight: Var,
    t_hidden: Tensor,
    t_weight: Tensor,
    batch: Batch,
    terms: Vec<(Box<dyn LossTerm>, f64)>,
}

fn random(rng: &mut ChaCha8Rng, dims: (usize, usize), scale: f32) -> Result<Tensor> {
    let v: Vec<f32> = (0..dims.0 * dims.1).map(|_| rng.random_range(-scale..scale)).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

fn fixture() -> Result<Fixture> {
    let build = retort_plugins::testing::loss_term;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..N).map(|i| ((i * 7919) % V) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, N), &Device::Cpu)?;
    Ok(Fixture {
        hidden: Var::from_tensor(&random(&mut rng, (N, H), 1.0)?.reshape((1, N, H))?)?,
        weight: Var::from_tensor(&random(&mut rng, (V, H), 0.05)?)?,
        t_hidden: random(&mut rng, (N, H), 1.0)?.reshape((1, N, H))?,
        t_weight: random(&mut rng, (V, H), 0.05)?,
        batch: Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        },
        terms: vec![
            (build("kl", serde_json::json!({"temperature": 2.0}))?, 0.7),
            (build("ce", serde_json::json!({}))?, 0.3),
        ],
    })
}

fn head(hidden: &Tensor, weight: &Tensor) -> Result<Outputs> {
    let mut o = Outputs::logits_only(Tensor::zeros((1, N, 0), DType::F32, &Device::Cpu)?);
    o.taps.insert(LM_HEAD_HIDDEN.into(), hidden.clone());
    o.taps.insert(LM_HEAD_WEIGHT.into(), weight.clone());
    Ok(o)
}

fn logits(hidden: &Tensor, weight: &Tensor) -> Result<Outputs> {
    let z = matmul(&hidden.reshape((N, H))?, &weight.t()?)?;
    Ok(Outputs::logits_only(z.reshape((1, N, V))?))
}

/// One step: the loss and the gradients of the student's head input and weight.
fn step(f: &Fixture, fused: bool) -> Result<(Tensor, Tensor)> {
    let (h, w) = (f.hidden.as_tensor(), f.weight.as_tensor());
    let (student, teacher) = if fused {
        (head(h, w)?, head(&f.t_hidden, &f.t_weight)?)
    } else {
        (logits(h, w)?, logits(&f.t_hidden, &f.t_weight)?)
    };
    let ctx = StepContext {
        batch: &f.batch,
        student: &student,
        teacher: Some(&teacher),
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let grads = if fused {
        let terms: Vec<HeadTerm> = f
            .terms
            .iter()
            .map(|(t, w)| HeadTerm {
                term: t.as_ref(),
                weight: *w,
            })
            .collect();
        let loss = fused_loss(&terms, &ctx, chunk_tokens(0, V), WeightGradient::InGraph)?;
        loss.total.backward()?
    } else {
        let mut total = (f.terms[0].0.compute(&ctx)? * f.terms[0].1)?;
        for (t, w) in &f.terms[1..] {
            total = (total + (t.compute(&ctx)? * *w)?)?;
        }
        total.backward()?
    };
    Ok((
        grads.get(h).context("dL/dh")?.clone(),
        grads.get(w).context("dL/dW")?.clone(),
    ))
}

fn bench(c: &mut Criterion) {
    let f = fixture().expect("fixture");
    let mut group = c.benchmark_group("lm_head");
    group.sample_size(10);
    group.throughput(Throughput::Elements(N as u64));
    for (name, fused) in [("unfused", false), ("fused", true)] {
        group.bench_function(name, |b| b.iter(|| step(&f, fused).expect("step")));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
