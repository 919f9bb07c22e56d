//! Times retort's reference KD step (see `retort_host::kdbench`) the way
//! `../shared/bench/torch_kd_reference.py kd STEPS` times PyTorch's, and prints a line in the
//! same format: `KD params=... median X ms/step Y tok/s`, then a split of 5 more steps into
//! phases (teacher forward, student forward, loss, backward, AdamW).
//!
//! `cargo run --release -p retort-host --example kd_step -- [STEPS]` (default 20, after 3 warm-up steps).
//!
//! The reference shapes can be changed for cost-growth measurements with `KD_BATCH`, `KD_BLOCK`,
//! `KD_VOCAB`, `KD_TEACHER_WIDTH` and `KD_STUDENT_WIDTH` (layers stay 4 and 2, heads 4).
//! `KD_MODE=train` times the reference script's `train` mode instead (the teacher trained
//! alone with cross-entropy; printed as `TRAIN params=...`); `KD_MODE=teacher` times the
//! teacher's forward pass alone (`TEACHER-FWD`).

use std::io::Write;

use anyhow::Result;
use candle_core::Device;
#[path = "../benches/kd_fixture/mod.rs"]
mod kd_fixture;
use kd_fixture::{time_steps, KdShapes, KdStep};

fn main() -> Result<()> {
    // Written with `writeln!` so that a closed pipe (`| head -1`) ends the program with an
    // error instead of a panic.
    let mut out = std::io::stdout();
    let steps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let mut shapes = KdShapes::reference();
    let env = |name: &str| -> Result<Option<usize>> { Ok(std::env::var(name).ok().map(|v| v.parse()).transpose()?) };
    if let Some(v) = env("KD_BATCH")? {
        shapes.batch = v;
    }
    if let Some(v) = env("KD_BLOCK")? {
        shapes.block = v;
    }
    if let Some(v) = env("KD_VOCAB")? {
        shapes.vocab = v;
    }
    if let Some(v) = env("KD_TEACHER_WIDTH")? {
        shapes.teacher.1 = v;
    }
    if let Some(v) = env("KD_STUDENT_WIDTH")? {
        shapes.student.1 = v;
    }
    let mode = std::env::var("KD_MODE").unwrap_or_default();
    if mode == "teacher" {
        // The teacher's forward alone (frozen, no graph), 3 warm-up passes.
        let mut step = KdStep::new(shapes, &Device::Cpu)?;
        let mut times = Vec::new();
        for i in 0..steps + 3 {
            let t = step.teacher_forward()?.unwrap_or(f64::NAN);
            if i >= 3 {
                times.push(t);
            }
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        writeln!(
            out,
            "retort TEACHER-FWD B={} T={} median {:.1} ms/step {:.0} tok/s",
            shapes.batch,
            shapes.block,
            median * 1e3,
            (shapes.batch * shapes.block) as f64 / median
        )?;
        return Ok(());
    }
    let train = mode == "train";
    let mut step = if train {
        KdStep::new_train(shapes, &Device::Cpu)?
    } else {
        KdStep::new(shapes, &Device::Cpu)?
    };
    let t = time_steps(&mut step, 3, steps)?;
    writeln!(
        out,
        "retort candle threads {} cores {} {} params={} B={} T={} loss={:.4} median {:.1} ms/step {:.0} tok/s",
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| rayon_threads().to_string()),
        rayon_threads(),
        if train { "TRAIN" } else { "KD" },
        step.student_params(),
        shapes.batch,
        shapes.block,
        t.loss,
        t.median * 1e3,
        t.tokens_per_s
    )?;
    // Where the time goes: 5 more steps split into phases (medians).
    let mut ph: Vec<[f64; 5]> = Vec::new();
    for _ in 0..5 {
        let (a, b, c, d, e) = step.phases()?;
        ph.push([a, b, c, d, e]);
    }
    let med = |i: usize| {
        let mut v: Vec<f64> = ph.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    writeln!(
        out,
        "phases (ms, median of 5): teacher fwd {:.1}, student fwd {:.1}, loss {:.1}, backward {:.1}, adamw {:.1}",
        med(0),
        med(1),
        med(2),
        med(3),
        med(4)
    )?;
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::kd_fixture::{time_steps, KdShapes, KdStep};
    use candle_core::Device;

    #[test]
    fn reference_step_trains_the_student() {
        let mut shapes = KdShapes::reference();
        shapes.batch = 2;
        shapes.block = 16;
        let mut step = KdStep::new(shapes, &Device::Cpu).expect("build");
        let first = step.step().expect("step");
        assert!(first.is_finite());
        // The same batch stream is random; the loss must stay finite and the weights move.
        let t = time_steps(&mut step, 1, 3).expect("timed");
        assert_eq!(t.times.len(), 3);
        assert!(t.loss.is_finite() && t.median > 0.0);
        let mut f = step.adamw_only().expect("adamw");
        f().expect("update");
    }
}
