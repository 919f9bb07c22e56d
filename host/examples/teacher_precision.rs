//! What a bf16 or f16 teacher costs and gains on this machine: forward time per batch
//! (median of repeats), weight memory, and fidelity against the same teacher in f32 (val loss,
//! mean KL(f32 || half) per token, top-1 agreement, max |logit difference|).
//!
//! ```text
//! cargo run --release -p retort-host --example teacher_precision -- CONFIG [--set KEY=VALUE]...
//! ```
//! CONFIG must give the teacher a `checkpoint` (e.g. `--set teacher.checkpoint=runs/shakespeare_char/teacher`).
//! Set `REPEATS` (default 5) for more timing passes over the validation batches.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};

use retort_core::{Split, TapSet};
use retort_host::assemble::config;
use retort_host::assemble::Pipeline;
use retort_host::engine::batching::val_batches;
use retort_host::engine::evaluate::evaluate;
use retort_plugins::losses::kl::kl_per_token;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(config) = args.first() else {
        bail!("usage: teacher_precision CONFIG [--set KEY=VALUE]...");
    };
    let mut sets = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--set" => sets.push(it.next().context("--set needs KEY=VALUE")?.clone()),
            other => bail!("unexpected argument `{other}`"),
        }
    }
    let repeats: usize = std::env::var("REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let registry = retort_host::builtin_registry()?;
    let mut reference: Option<Vec<Tensor>> = None;
    println!("| precision | weights MiB | forward ms/batch (median of {repeats}) | speed vs f32 | val loss | KL(f32‖this) nats/tok | top-1 agree with f32 | max abs Δlogit |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut f32_ms = None;
    for precision in ["f32", "bf16", "f16"] {
        let mut s = sets.clone();
        s.push(format!("teacher.precision=\"{precision}\""));
        let (cfg, _) = config::load(Some(config.as_ref()), &s)?;
        let p = Pipeline::assemble(cfg, &registry)?;
        let teacher = p
            .teacher
            .as_ref()
            .context("the config must give the teacher a checkpoint")?;
        let c = &p.config;
        let val = val_batches(
            p.data.tokens(Split::Val),
            c.eval.batches,
            c.eval.batch_size,
            c.train.seq_len,
            &p.device,
        )?;
        let mut times = Vec::new();
        let mut logits = Vec::new();
        for r in 0..repeats {
            let t0 = Instant::now();
            let mut out = Vec::with_capacity(val.len());
            for b in &val {
                out.push(teacher.forward(b, &TapSet::none())?.logits);
            }
            times.push(t0.elapsed().as_secs_f64() * 1e3 / val.len() as f64);
            if r == 0 {
                logits = out;
            }
        }
        times.sort_by(f64::total_cmp);
        let ms = times[times.len() / 2];
        let base = *f32_ms.get_or_insert(ms);
        let e = evaluate(&|i, _| Ok(logits[i].clone()), &val, None)?;
        let bytes_per = match precision {
            "f32" => 4,
            _ => 2,
        };
        let mib = (teacher.num_params() * bytes_per) as f64 / (1 << 20) as f64;
        let (kl, agree, maxd) = match &reference {
            None => (0.0, 1.0, 0.0),
            Some(refs) => {
                let (mut kl, mut agree, mut n, mut maxd) = (0.0, 0.0, 0usize, 0f32);
                for (r, l) in refs.iter().zip(&logits) {
                    kl += kl_per_token(l, r, 1.0)?
                        .to_dtype(DType::F64)?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                    agree += r
                        .argmax(D::Minus1)?
                        .eq(&l.argmax(D::Minus1)?)?
                        .to_dtype(DType::F64)?
                        .sum_all()?
                        .to_scalar::<f64>()?;
                    n += r.elem_count() / r.dim(D::Minus1)?;
                    maxd = maxd.max((r - l)?.abs()?.max_all()?.to_scalar::<f32>()?);
                }
                (kl / n as f64, agree / n as f64, maxd)
            }
        };
        println!(
            "| {precision} | {mib:.2} | {ms:.2} | {:.2}x | {:.4} | {kl:.2e} | {agree:.4} | {maxd:.4} |",
            base / ms,
            e.val_loss
        );
        if reference.is_none() {
            reference = Some(logits);
        }
    }
    Ok(())
}
