//! Criterion benches of the reference KD training step (teacher 4L/128, student 2L/64,
//! vocab 65, block 128, batch 16: student fwd + teacher fwd + `ce`/`kl` + backward + AdamW)
//! and of the AdamW update alone on the student's parameters.
//!
//! `cargo bench -p retort-host --bench kd_step`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
mod kd_fixture;
use kd_fixture::{KdShapes, KdStep};

fn bench(c: &mut Criterion) {
    let shapes = KdShapes::reference();
    let mut step = KdStep::new(shapes, &Device::Cpu).expect("build the reference step");
    let mut g = c.benchmark_group("kd_step_reference");
    g.sample_size(20);
    g.throughput(Throughput::Elements((shapes.batch * shapes.block) as u64));
    g.bench_function("full_step_tokens", |b| b.iter(|| step.step().expect("step")));
    g.finish();

    let params = step.student_params();
    let mut update = step.adamw_only().expect("gradients");
    let mut g = c.benchmark_group("adamw");
    g.sample_size(30);
    g.throughput(Throughput::Elements(params as u64));
    g.bench_function("student_2L64_params", |b| b.iter(|| update().expect("update")));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
