//! Peak memory and time of one KD loss forward+backward at LLM scale: the dense logit terms
//! (`kl`, `reverse_kl`, `jsd`, `ce`) and `topk_kl` fed a sparse teacher (as from a logit cache),
//! each by its fused kernel (default) or composed of candle ops (`--composite`).
//!
//! `cargo run --release -p retort-plugins --example loss_memory -- KIND [N] [V] [K] [--composite] [--reps R]`
//! (defaults N = 2048 tokens, V = 50257, K = 64, R = 1). Prints each repetition's time, the
//! median, and the peak resident set (VmHWM from /proc/self/status, Linux) so runs can be
//! compared; run one configuration per process, since the peak is per process.

use std::time::Instant;

/// mimalloc keeps freed blocks for reuse instead of returning them to the OS and faulting them
/// in again on the next step (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// `--kernel`: the fused divergence's two sweeps alone (no autograd), each timed, with the bytes
/// they must move (forward: both logit matrices read; backward: both read, the gradient
/// written) over the time, to set against the `bandwidth` bench.
fn kernels_alone(kind: &str, student: &Tensor, teacher: &Outputs, reps: usize) -> Result<()> {
    use retort_plugins::kernels::divergence::{per_token_and_grad, Divergence};
    let div = match kind {
        "kl" => Divergence::Forward,
        "reverse_kl" => Divergence::Reverse,
        "jsd" => Divergence::Jsd(0.5),
        _ => bail!("--kernel takes kl, reverse_kl or jsd"),
    };
    let n = student.elem_count() / student.dim(candle_core::D::Minus1)?;
    let w = Tensor::full(
        1.0 / n as f32,
        student.dims()[..student.rank() - 1].to_vec(),
        student.device(),
    )?;
    let (mut fwd, mut bwd, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let start = Instant::now();
        let (d, g) = per_token_and_grad(student, &teacher.logits, 2.0, div, &w)?;
        total.push(start.elapsed().as_secs_f64());
        std::hint::black_box((d, g));
        // The forward alone, for the split.
        let start = Instant::now();
        let d = retort_plugins::kernels::divergence::per_token(student, &teacher.logits, 2.0, div)?;
        fwd.push(start.elapsed().as_secs_f64());
        std::hint::black_box(d);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, t) = (med(&mut fwd), med(&mut total));
    bwd.push(t - f);
    let bytes = (student.elem_count() * 4) as f64;
    let gib = 5.0 * bytes / (1u64 << 30) as f64;
    println!(
        "{kind} kernels: forward {f:.4}s, forward+backward {t:.4}s (backward ~{:.4}s); {gib:.2} GiB moved (2 read + 3 read/written matrices) = {:.1} GiB/s",
        bwd[0],
        gib / t
    );
    Ok(())
}

fn main() -> Result<()> {
    retort_plugins::link();
    let all: Vec<String> = std::env::args().collect();
    let composite = all.iter().any(|a| a == "--composite");
    let reps: usize = all
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| all.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1);
    let mut args: Vec<String> = Vec::new();
    let mut skip = false;
    for a in &all {
        if skip {
            skip = false;
        } else if a == "--reps" {
            skip = true;
        } else if !a.starts_with("--") {
            args.push(a.clone());
        }
    }
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
    let mut params = match kind {
        "kl" | "reverse_kl" => serde_json::json!({"temperature": 2.0}),
        "jsd" => serde_json::json!({"beta": 0.5}),
        "ce" => serde_json::json!({"label_smoothing": 0.1}),
        "topk_kl" => serde_json::json!({ "k": k }),
        _ => bail!("expected kl, reverse_kl, jsd, ce or topk_kl"),
    };
    params["fused"] = (!composite).into();
    let term = (factory.build)(
        &Params::new("loss[0]", params.as_object().context("object")?.clone()),
        &ctx,
    )?;
    let teacher = if kind != "topk_kl" {
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
    let ids: Vec<u32> = (0..n).map(|i| ((i * 31) % v) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, n), &dev)?;
    let batch = Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: None,
        source: None,
    };
    if all.iter().any(|a| a == "--kernel") {
        return kernels_alone(kind, student.as_tensor(), &teacher, reps);
    }
    let before = peak_rss_mib();
    let s = Outputs::logits_only(student.as_tensor().clone());
    let ctx = StepContext {
        batch: &batch,
        student: &s,
        teacher: Some(&teacher),
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let (mut times, mut fwd_times) = (Vec::new(), Vec::new());
    let (mut lv, mut gsum) = (0f32, 0f32);
    for _ in 0..reps {
        let start = Instant::now();
        let loss = term.compute(&ctx)?;
        lv = loss.to_scalar::<f32>()?;
        let fwd = start.elapsed().as_secs_f64();
        let grads = loss.backward()?;
        let g = grads.get(student.as_tensor()).context("student gradient")?;
        times.push(start.elapsed().as_secs_f64());
        fwd_times.push(fwd);
        gsum = g.abs()?.sum_all()?.to_scalar::<f32>()?;
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    fwd_times.sort_by(f64::total_cmp);
    let fwd_median = fwd_times[fwd_times.len() / 2];
    println!(
        "{kind} ({}): N={n} V={v} K={k} loss={lv:.5} |grad|_1={gsum:.3} times={:?} median={median:.3}s (forward {fwd_median:.3}s) peak_rss_before_loss={:.0}MiB peak_rss={:.0}MiB",
        if composite { "composite" } else { "fused" },
        times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        before.unwrap_or(f64::NAN),
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
