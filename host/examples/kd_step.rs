//! Times retort's reference KD step (see `retort_host::kdbench`) the way
//! `../shared/bench/torch_kd_reference.py kd STEPS` times PyTorch's, and prints a line in the
//! same format: `KD params=... median X ms/step Y tok/s`.
//!
//! `cargo run --release -p retort-host --example kd_step -- [STEPS]` (default 20, after 3 warm-up steps).

use anyhow::Result;
use candle_core::Device;
use retort_host::kdbench::{time_steps, KdShapes, KdStep};

fn main() -> Result<()> {
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let shapes = KdShapes::reference();
    let mut step = KdStep::new(shapes, &Device::Cpu)?;
    let t = time_steps(&mut step, 3, steps)?;
    println!(
        "retort candle {} threads {} KD params={} B={} T={} loss={:.4} median {:.1} ms/step {:.0} tok/s",
        candle_core::utils::get_num_threads(),
        rayon_threads(),
        step.student_params(),
        shapes.batch,
        shapes.block,
        t.loss,
        t.median * 1e3,
        t.tokens_per_s
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
