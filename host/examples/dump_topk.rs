//! TEMP: dump teacher top-128 (ids u32, logprobs f32) + logsumexp-independent stats for codec design.
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, D};
use retort_core::model::dense_topk;
use retort_core::{Split, TapSet};
use retort_host::assemble::config;
use retort_host::assemble::Pipeline;
use retort_host::engine::batching::val_batches;
use std::io::Write;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = &args[0];
    let out = &args[1];
    let nb: usize = args[2].parse()?;
    let registry = retort_host::builtin_registry()?;
    let (cfg, _) = config::load(Some(config.as_ref()), &[])?;
    let p = Pipeline::assemble(cfg, &registry)?;
    let teacher = p.teacher.as_ref().context("teacher")?;
    let val = val_batches(p.data.tokens(Split::Train), nb, 4, 128, &p.device)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut g = std::io::BufWriter::new(std::fs::File::create(format!("{out}.full"))?);
    for (i, b) in val.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let logits = teacher.forward(b, &TapSet::none())?.logits;
        let v = logits.dim(D::Minus1)?;
        let flat = logits.reshape(((), v))?;
        let (ids, lp) = dense_topk(&flat, 128)?;
        let ids: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let lp: Vec<f32> = lp.flatten_all()?.to_vec1()?;
        for x in ids {
            f.write_all(&x.to_le_bytes())?;
        }
        for x in lp {
            f.write_all(&x.to_le_bytes())?;
        }
        // full log-probs for the first 2 batches (exact KL evaluation)
        if i < 2 {
            let max = flat.max_keepdim(D::Minus1)?;
            let sh = flat.broadcast_sub(&max)?;
            let lse = sh.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let l = sh.broadcast_sub(&lse)?.to_dtype(DType::F32)?;
            let l: Vec<f32> = l.flatten_all()?.to_vec1()?;
            for x in l {
                g.write_all(&x.to_le_bytes())?;
            }
        }
        eprintln!("batch {i} {:.1}s", t0.elapsed().as_secs_f64());
        let _ = Tensor::zeros(1, DType::F32, &p.device)?;
    }
    Ok(())
}
