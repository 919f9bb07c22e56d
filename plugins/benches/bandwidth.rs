//! Read bandwidth of this machine: summing a 1 GiB f32 buffer on the rayon pool (2 threads
//! here), the ceiling a memory-bound kernel can reach. Criterion reports it as throughput
//! (bytes/s); `docs/performance.md` quotes kernels as a share of it.
//!
//! `cargo bench -p retort-plugins --bench bandwidth`

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;

const N: usize = 256 << 20; // 256 Mi f32 = 1 GiB, far beyond any cache

fn sum_chunk(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for c in x.chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum()
}

fn bench(c: &mut Criterion) {
    let buf: Vec<f32> = (0..N).map(|i| (i % 7) as f32).collect();
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((N * 4) as u64));
    g.bench_function("read_1GiB_f32_sum_rayon", |b| {
        b.iter(|| buf.par_chunks(1 << 20).map(sum_chunk).sum::<f32>())
    });
    g.bench_function("read_1GiB_f32_sum_1thread", |b| b.iter(|| sum_chunk(&buf)));
    let mut dst = vec![0f32; N];
    g.throughput(Throughput::Bytes((N * 8) as u64));
    g.bench_function("copy_1GiB_f32_rayon(read+write)", |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 20)
                .zip(buf.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
