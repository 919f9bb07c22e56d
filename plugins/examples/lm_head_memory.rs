//! Peak memory and time of the loss region of a KD step at LLM scale, fused with the LM head
//! (`kernels::lm_head`) or not: `0.7 kl(T = 2) + 0.3 ce` from the student's final hidden states
//! `h [N, H]` and head `W [V, H]`, and the teacher's hidden states and head (`--teacher head`,
//! default: its logits made inside the region) or its logits given (`--teacher dense`), forward
//! and backward to `dL/dh` and `dL/dW`.
//!
//! `cargo run --release -p retort-plugins --example lm_head_memory -- [N] [H] [V] [--unfused]
//! [--teacher head|dense] [--chunk C] [--reps R] [--device cpu|cuda] [--dtype f32|bf16]`
//! (defaults N = 2048, H = 576, V = 49152, C = automatic, R = 3, the CPU, f32). Prints each
//! repetition's time, the median, and on the CPU the peak resident set of the region: the
//! process's peak (VmHWM) minus its resident set once the inputs exist. Run one configuration
//! per process (the peak is per process); `scripts/bench_lm_head.sh` runs the table of
//! docs/performance.md, `scripts/gpu_run.sh` the GPU rows (peak memory there from
//! `nvidia-smi`).

use std::time::Instant;

/// mimalloc, as the `retort` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retort_core::taps::{LM_HEAD_HIDDEN, LM_HEAD_WEIGHT};
use retort_core::{Batch, LossTerm, Outputs, Progress, StepContext};
use retort_plugins::kernels::lm_head::{chunk_tokens, fused_loss, HeadTerm, WeightGradient};
use retort_plugins::models::nn::matmul;

fn status_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok());
    kib.map_or(f64::NAN, |k| k / 1024.0)
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Result<Option<T>> {
    match args.iter().position(|a| a == name) {
        Some(i) => {
            let v = args.get(i + 1).with_context(|| format!("{name} takes a value"))?;
            Ok(Some(
                v.parse().map_err(|_| anyhow::anyhow!("{name}: cannot parse `{v}`"))?,
            ))
        }
        None => Ok(None),
    }
}

/// Where and in what the region runs.
struct Place {
    device: Device,
    dtype: DType,
}

impl Place {
    fn random(&self, rng: &mut ChaCha8Rng, dims: (usize, usize), scale: f32) -> Result<Tensor> {
        let v: Vec<f32> = (0..dims.0 * dims.1).map(|_| rng.random_range(-scale..scale)).collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(&self.device)?)
    }

    fn empty_logits(&self, n: usize) -> Result<Tensor> {
        Ok(Tensor::zeros((1, n, 0), self.dtype, &self.device)?)
    }
}

fn place(args: &[String]) -> Result<Place> {
    let device = match flag::<String>(args, "--device")?.as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::new_cuda(0)?,
        Some(other) => bail!("--device takes cpu or cuda, got `{other}`"),
    };
    let dtype = match flag::<String>(args, "--dtype")?.as_deref() {
        None | Some("f32") => DType::F32,
        Some("bf16") => DType::BF16,
        Some(other) => bail!("--dtype takes f32 or bf16, got `{other}`"),
    };
    Ok(Place { device, dtype })
}

fn terms() -> Result<Vec<(Box<dyn LossTerm>, f64)>> {
    let build = retort_plugins::testing::loss_term;
    Ok(vec![
        (build("kl", serde_json::json!({"temperature": 2.0}))?, 0.7),
        (build("ce", serde_json::json!({}))?, 0.3),
    ])
}

fn main() -> Result<()> {
    retort_plugins::link();
    let args: Vec<String> = std::env::args().collect();
    let unfused = args.iter().any(|a| a == "--unfused");
    // `--fused` (the default) is accepted for symmetry.
    let teacher_form: String = flag(&args, "--teacher")?.unwrap_or_else(|| "head".into());
    if teacher_form != "head" && teacher_form != "dense" {
        bail!("--teacher takes head or dense");
    }
    let reps: usize = flag(&args, "--reps")?.unwrap_or(3);
    let mut pos = Vec::new();
    let mut skip = false;
    for a in args.iter().skip(1) {
        if skip {
            skip = false;
        } else if ["--teacher", "--chunk", "--reps", "--device", "--dtype"].contains(&a.as_str()) {
            skip = true;
        } else if !a.starts_with("--") {
            pos.push(
                a.parse::<usize>()
                    .with_context(|| format!("expected a number, got `{a}`"))?,
            );
        }
    }
    let (n, h, v) = (
        pos.first().copied().unwrap_or(2048),
        pos.get(1).copied().unwrap_or(576),
        pos.get(2).copied().unwrap_or(49152),
    );
    let chunk = chunk_tokens(flag(&args, "--chunk")?.unwrap_or(0), v);
    let at = place(&args)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let hidden = Var::from_tensor(&at.random(&mut rng, (n, h), 1.0)?.reshape((1, n, h))?)?;
    let weight = Var::from_tensor(&at.random(&mut rng, (v, h), 0.05)?)?;
    let t_hidden = at.random(&mut rng, (n, h), 1.0)?.reshape((1, n, h))?;
    let t_weight = at.random(&mut rng, (v, h), 0.05)?;
    let t_logits = match teacher_form.as_str() {
        "dense" => Some(matmul(&t_hidden.reshape((n, h))?, &t_weight.t()?)?.reshape((1, n, v))?),
        _ => None,
    };
    let ids: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
    let ids = Tensor::from_vec(ids, (1, n), &at.device)?;
    let batch = Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: None,
        source: None,
    };
    let terms = terms()?;
    let base = status_mib("VmRSS:");
    let mut times = Vec::new();
    let mut last = (0f64, 0f64);
    for _ in 0..reps {
        let start = Instant::now();
        let teacher = match &t_logits {
            Some(z) => Outputs::logits_only(z.clone()),
            None if unfused => {
                Outputs::logits_only(matmul(&t_hidden.reshape((n, h))?, &t_weight.t()?)?.reshape((1, n, v))?)
            }
            None => {
                let mut o = Outputs::logits_only(at.empty_logits(n)?);
                o.taps.insert(LM_HEAD_HIDDEN.into(), t_hidden.clone());
                o.taps.insert(LM_HEAD_WEIGHT.into(), t_weight.clone());
                o
            }
        };
        let student = if unfused {
            let z = matmul(&hidden.as_tensor().reshape((n, h))?, &weight.as_tensor().t()?)?;
            Outputs::logits_only(z.reshape((1, n, v))?)
        } else {
            let mut o = Outputs::logits_only(at.empty_logits(n)?);
            o.taps.insert(LM_HEAD_HIDDEN.into(), hidden.as_tensor().clone());
            o.taps.insert(LM_HEAD_WEIGHT.into(), weight.as_tensor().clone());
            o
        };
        let ctx = StepContext {
            batch: &batch,
            student: &student,
            teacher: Some(&teacher),
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let mut weight_grad = None;
        let total = if unfused {
            let mut total: Option<Tensor> = None;
            for (t, w) in &terms {
                let x = (t.compute(&ctx)? * *w)?;
                total = Some(match total {
                    Some(s) => (s + x)?,
                    None => x,
                });
            }
            total.context("no terms")?
        } else {
            let ht: Vec<HeadTerm> = terms
                .iter()
                .map(|(t, w)| HeadTerm {
                    term: t.as_ref(),
                    weight: *w,
                })
                .collect();
            // As the engine does: dL/dW comes back and is added to the weight's gradient.
            let loss = fused_loss(&ht, &ctx, chunk, WeightGradient::Returned)?;
            weight_grad = loss.weight_grad;
            loss.total
        };
        let mut grads = total.backward()?;
        if let Some((w, g)) = weight_grad {
            let g = match grads.remove(&w) {
                Some(x) => (x + g)?,
                None => g,
            };
            grads.insert(&w, g);
        }
        let gw = grads.get(weight.as_tensor()).context("dL/dW")?;
        let gh = grads.get(hidden.as_tensor()).context("dL/dh")?;
        // One pass each, no temporaries: the norm must not add to the region's peak.
        let squares = retort_plugins::kernels::adamw::sum_squares(&[gw.clone(), gh.clone()])?;
        last = (
            total.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            squares.iter().sum::<f64>().sqrt(),
        );
        at.device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "{} {:?} {:?} teacher={teacher_form} N={n} H={h} V={v}{}: loss={:.6} |grad|={:.6} times={:?} median={:.3}s region_peak={}",
        if unfused { "unfused" } else { "fused" },
        at.device.location(),
        at.dtype,
        if unfused { String::new() } else { format!(" chunk={chunk}") },
        last.0,
        last.1,
        times.iter().map(|t| (t * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        sorted[sorted.len() / 2],
        if at.device.is_cpu() {
            format!("{:.0}MiB (inputs {base:.0}MiB)", status_mib("VmHWM:") - base)
        } else {
            "not measured here (GPU: nvidia-smi)".into()
        },
    );
    Ok(())
}
