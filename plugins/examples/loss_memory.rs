//! Peak memory and time of one KD loss forward+backward at LLM scale, dense `kl` against
//! `topk_kl` fed a sparse teacher (as from a logit cache).
//!
//! `cargo run --release -p retort-plugins --example loss_memory -- kl|topk_kl [N] [V] [K]`
//! (defaults N = 2048 tokens, V = 50257, K = 64). Prints the peak resident set (VmHWM from
//! /proc/self/status, Linux) so the two can be compared run against run.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::registry::Factory;
use retort_core::{Batch, BuildContext, LossTerm, Outputs, Params, Progress, Registry, StepContext};

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> Result<()> {
    retort_plugins::link();
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map(String::as_str).unwrap_or("kl");
    let n: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2048);
    let v: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(50257);
    let k: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let student: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0..3.0)).collect();
    let student = Var::from_tensor(&Tensor::from_vec(student, (1, n, v), &dev)?)?;
    let mut reg = Registry::empty();
    for f in retort_core::inventory::iter::<Factory<dyn retort_core::Schedule>> {
        reg.schedules.register(f, "built-in")?;
    }
    let mut ctx = BuildContext::new(&reg, dev.clone(), 0);
    ctx.vocab_size = Some(v);
    let factory = retort_core::inventory::iter::<Factory<dyn LossTerm>>
        .into_iter()
        .find(|f| f.kind == kind)
        .with_context(|| format!("no loss kind {kind}"))?;
    let params = match kind {
        "kl" => serde_json::json!({"temperature": 1.0}),
        "topk_kl" => serde_json::json!({ "k": k }),
        _ => bail!("expected kl or topk_kl"),
    };
    let term = (factory.build)(
        &Params::new("loss[0]", params.as_object().context("object")?.clone()),
        &ctx,
    )?;
    let teacher = if kind == "kl" {
        let t: Vec<f32> = (0..n * v).map(|_| rng.random_range(-3.0..3.0)).collect();
        Outputs::logits_only(Tensor::from_vec(t, (1, n, v), &dev)?)
    } else {
        // A sparse teacher as a cache stores it: k distinct ids and descending log-probs per token.
        let ids: Vec<u32> = (0..n)
            .flat_map(|i| (0..k).map(move |j| ((i * 7919 + j * 104_729) % v) as u32))
            .collect();
        // Log-probs of a proper distribution: 90% of the mass on the k ids (descending), 10% tail.
        let z: f32 = (0..k).map(|j| (-0.1 * j as f32).exp()).sum();
        let lp: Vec<f32> = (0..n)
            .flat_map(|_| (0..k).map(move |j| (0.9 * (-0.1 * j as f32).exp() / z).ln()))
            .collect();
        let mut o = Outputs::logits_only(Tensor::zeros((1, 1, 1), DType::F32, &dev)?);
        o.taps
            .insert(format!("topk.{k}.ids"), Tensor::from_vec(ids, (1, n, k), &dev)?);
        o.taps
            .insert(format!("topk.{k}.logprobs"), Tensor::from_vec(lp, (1, n, k), &dev)?);
        o
    };
    let ids = Tensor::zeros((1, n), DType::U32, &dev)?;
    let batch = Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: None,
    };
    let before = peak_rss_mib();
    let start = Instant::now();
    let s = Outputs::logits_only(student.as_tensor().clone());
    let ctx = StepContext {
        batch: &batch,
        student: &s,
        teacher: Some(&teacher),
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let loss = term.compute(&ctx)?;
    let grads = loss.backward()?;
    let g = grads.get(student.as_tensor()).context("student gradient")?;
    let gsum = g.abs()?.sum_all()?.to_scalar::<f32>()?;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{kind}: N={n} V={v} K={k} loss={:.5} |grad|_1={gsum:.3} time={:.3}s peak_rss_before_loss={:.0}MiB peak_rss={:.0}MiB",
        loss.to_scalar::<f32>()?,
        elapsed,
        before.unwrap_or(f64::NAN),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
