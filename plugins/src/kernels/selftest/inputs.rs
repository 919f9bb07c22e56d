//! Seeded random inputs, made on the host (so every device tests the same values) and in
//! blocks on the rayon pool (the largest case draws ~2e9 samples): logits `~ N(0, 2)`, per-row
//! weights in `[0, 1]` with about a quarter of the rows zero (padding mask times router
//! weights), class ids, and the top-k union the top-k KL takes.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use retort_core::model::dense_topk;
use retort_core::ops::log_softmax;

/// Samples per block of the generator; block `i` draws from stream `i` of the seed.
const BLOCK: usize = 1 << 16;

/// Share of the rows whose weight is zero.
const ZERO_ROWS: f64 = 0.25;

/// `n` samples of `draw`, block `i` from stream `i` of a ChaCha8 generator seeded by `seed`.
fn fill(n: usize, seed: u64, draw: impl Fn(&mut ChaCha8Rng) -> f32 + Sync) -> Vec<f32> {
    let mut data = vec![0f32; n];
    data.par_chunks_mut(BLOCK).enumerate().for_each(|(i, block)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(i as u64);
        block.iter_mut().for_each(|x| *x = draw(&mut rng));
    });
    data
}

/// `dims`-shaped f32 samples of `N(mean, std^2)` on the host.
pub fn normal(dims: &[usize], mean: f32, std: f32, seed: u64) -> Result<Tensor> {
    let n = dims.iter().product();
    let data = fill(n, seed, |rng| mean + std * rng.sample::<f32, _>(StandardNormal));
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Logits `~ N(0, 2^2)`, `dims` `[.., V]`.
pub fn logits(dims: &[usize], seed: u64) -> Result<Tensor> {
    normal(dims, 0.0, 2.0, seed)
}

/// Weights `dims`-shaped in `[0, 1]`, each run of `row_len` elements (a row) zero with
/// probability [`ZERO_ROWS`]: the cotangent of an op's output (`row_len` 1 for one value per
/// token).
pub fn row_weights(dims: &[usize], row_len: usize, seed: u64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let row_len = row_len.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d61_736b);
    let mask: Vec<f32> = (0..n.div_ceil(row_len))
        .map(|_| f32::from(u8::from(rng.random::<f64>() >= ZERO_ROWS)))
        .collect();
    let rows = mask.len();
    let u = Tensor::from_vec(fill(n, seed, |rng| rng.random::<f32>()), (rows, row_len), &Device::Cpu)?;
    u.broadcast_mul(&Tensor::from_vec(mask, (rows, 1), &Device::Cpu)?)?
        .reshape(dims)
}

/// Class ids in `0..vocab`, `dims`-shaped, as u32.
pub fn class_ids(dims: &[usize], vocab: usize, seed: u64) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
    Tensor::from_vec(ids, dims, &Device::Cpu)
}

/// What the top-k KL takes with the student's ids joined in, as the `topk_kl` term's union
/// builds it: `(ids, lpt)` `[.., k + 2 j]`, `j = k / 4`: the teacher's top-`k` ids of
/// `teacher` logits and their log-probs (temperature 1), then `j` of those ids again and the
/// student's top-`j` ids, with the teacher's log-probs there, except `-inf` (skipped) on every
/// id already among the teacher's.
pub fn topk_union(student: &Tensor, teacher: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let j = (k / 4).max(1);
    let (ids, lpt) = dense_topk(teacher, k).map_err(candle_core::Error::wrap)?;
    let (student_ids, _) = dense_topk(student, j).map_err(candle_core::Error::wrap)?;
    let extra = Tensor::cat(&[&ids.narrow(D::Minus1, 0, j)?, &student_ids], D::Minus1)?.contiguous()?;
    let lpt_extra = log_softmax(&teacher.to_dtype(DType::F32)?)?.gather(&extra, D::Minus1)?;
    let dup = extra
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&ids.unsqueeze(D::Minus2)?)?
        .to_dtype(DType::F32)?
        .max(D::Minus1)?;
    let skip = Tensor::full(f32::NEG_INFINITY, lpt_extra.dims(), lpt_extra.device())?;
    let lpt_extra = dup.gt(0.5)?.where_cond(&skip, &lpt_extra)?;
    Ok((
        Tensor::cat(&[&ids, &extra], D::Minus1)?,
        Tensor::cat(&[&lpt.to_dtype(DType::F32)?, &lpt_extra], D::Minus1)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::values;

    #[test]
    fn samples_are_seeded_and_independent_of_the_thread_count() {
        let a = values(&normal(&[3, BLOCK + 7], 0.0, 2.0, 5).expect("a"));
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(|| values(&normal(&[3, BLOCK + 7], 0.0, 2.0, 5).expect("b")));
        assert_eq!(a, b);
        let c = values(&normal(&[3, BLOCK + 7], 0.0, 2.0, 6).expect("c"));
        assert_ne!(a, c);
        let n = a.len() as f64;
        let mean = a.iter().sum::<f64>() / n;
        let sd = (a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.05 && (sd - 2.0).abs() < 0.05, "mean {mean}, sd {sd}");
    }

    #[test]
    fn row_weights_zero_about_a_quarter_of_the_rows() {
        let w = values(&row_weights(&[400, 5], 5, 3).expect("w"));
        let rows: Vec<&[f64]> = w.chunks(5).collect();
        let zero = rows.iter().filter(|r| r.iter().all(|&x| x == 0.0)).count();
        assert!((70..130).contains(&zero), "{zero} zero rows of 400");
        assert!(w.iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert!(rows
            .iter()
            .all(|r| r.iter().all(|&x| x == 0.0) || r.iter().all(|&x| x > 0.0)));
    }

    #[test]
    fn the_union_marks_repeated_ids_minus_infinity() {
        let zs = logits(&[6, 50], 1).expect("zs");
        let zt = logits(&[6, 50], 2).expect("zt");
        let (ids, lpt) = topk_union(&zs, &zt, 8).expect("union");
        assert_eq!(ids.dims(), &[6, 12]);
        let ids: Vec<Vec<u32>> = ids.to_vec2().expect("ids");
        let lpt: Vec<Vec<f32>> = lpt.to_vec2().expect("lpt");
        for (row, lp) in ids.iter().zip(&lpt) {
            for (i, id) in row.iter().enumerate() {
                let repeated = row[..i].contains(id);
                assert_eq!(lp[i] == f32::NEG_INFINITY, repeated, "{row:?} {lp:?}");
            }
            // The teacher's ids come again, so every row has skipped entries.
            assert!(lp.iter().filter(|x| x.is_infinite()).count() >= 2);
        }
    }
}
