//! Logit cache throughput: encoding a shard (write) and decoding windows from a memory-mapped
//! shard in a shuffled order (read, single thread), in tokens per second, for k = 16, 64, 128,
//! on synthetic language-model-like top-k distributions (Zipf-distributed ids, power-law
//! probabilities with ~18% tail mass, V = 49,152). Also prints bytes/token against the seed
//! design (top-k fp32 values + int64 ids before gzip).
//!
//! `cargo bench -p retort-plugins --bench cache`
//!
//! Sizes on real teacher logits differ (ids repeat less regularly than here): measure them
//! with `retort cache inspect PATH --bench-read` on a cache built from a real teacher
//! (docs/cache-format.md has the SmolLM2 figures and commands).

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use retort_core::Split;
use retort_plugins::cache::shard::{encode_shard, Shard, ShardSpec};
use retort_plugins::cache::ValueCoding;

const V: u32 = 49_152;
const SEQ: usize = 128;
const WINDOWS: usize = 256;

/// `WINDOWS * SEQ` tokens of top-`k` rows: distinct ids drawn from a Zipf(1.1) over `V`, and
/// probabilities `~ j^-1.3` (with jitter) scaled to leave a tail of 10-30%.
fn synthetic(k: usize, seed: u64) -> (Vec<u32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cdf: Vec<f64> = {
        let mut acc = 0.0;
        let w: Vec<f64> = (1..=V).map(|r| (r as f64).powf(-1.1)).collect();
        let total: f64 = w.iter().sum();
        w.iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect()
    };
    let tokens = WINDOWS * SEQ;
    let mut ids = Vec::with_capacity(tokens * k);
    let mut lps = Vec::with_capacity(tokens * k);
    let mut row = Vec::with_capacity(k);
    for _ in 0..tokens {
        row.clear();
        while row.len() < k {
            let u: f64 = rng.random();
            let id = cdf.partition_point(|&c| c < u).min(V as usize - 1) as u32;
            if !row.contains(&id) {
                row.push(id);
            }
        }
        let raw: Vec<f64> = (1..=k)
            .map(|j| (j as f64).powf(-1.3) * (1.0 + 0.3 * rng.random::<f64>()))
            .collect();
        let head = 0.7 + 0.2 * rng.random::<f64>();
        let z: f64 = raw.iter().sum::<f64>() / head;
        let mut sorted = raw.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        ids.extend_from_slice(&row);
        lps.extend(sorted.iter().map(|p| (p / z).ln() as f32));
    }
    (ids, lps)
}

fn spec(k: usize, coding: ValueCoding) -> ShardSpec {
    ShardSpec {
        split: Split::Train,
        index: 0,
        k: k as u32,
        seq_len: SEQ as u32,
        vocab: V,
        coding,
        compressed: true,
        windows: WINDOWS as u32,
        first_window: 0,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut g = c.benchmark_group("cache");
    g.sample_size(10);
    for k in [16usize, 64, 128] {
        let (ids, lps) = synthetic(k, k as u64);
        let coding = ValueCoding::sqrt_for(k, 4e-4);
        let s = spec(k, coding);
        let tokens = WINDOWS * SEQ;
        let bytes = encode_shard(&s, &ids, &lps, 9).expect("encode");
        eprintln!(
            "k = {k}: {} ({:.1e} expected KL): {:.1} bytes/token; seed design {} bytes/token before gzip",
            coding.name(),
            coding.expected_kl(k),
            bytes.len() as f64 / tokens as f64,
            k * 12
        );
        g.throughput(Throughput::Elements(tokens as u64));
        g.bench_function(format!("write_k{k}_tokens"), |b| {
            b.iter(|| black_box(encode_shard(&s, &ids, &lps, 9).expect("encode").len()))
        });
        let path = dir.path().join(format!("k{k}.shard"));
        std::fs::write(&path, &bytes).expect("write");
        let shard = Shard::open(&path, &s).expect("open");
        let mut order: Vec<usize> = (0..WINDOWS).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut dec = zstd::bulk::Decompressor::new().expect("zstd");
        let (mut scratch, mut out_ids, mut out_lps) = (Vec::new(), Vec::new(), Vec::new());
        g.bench_function(format!("read_k{k}_tokens"), |b| {
            b.iter(|| {
                for &w in &order {
                    out_ids.clear();
                    out_lps.clear();
                    shard
                        .read_window(w, k, &mut dec, &mut scratch, &mut out_ids, &mut out_lps)
                        .expect("read");
                }
                black_box(out_lps.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
