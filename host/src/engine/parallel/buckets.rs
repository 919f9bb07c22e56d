//! Gradient averaging in buckets: consecutive gradients are flattened into one f32 buffer of
//! about `bucket_bytes`, summed across ranks in one collective call, divided by the number of
//! ranks and split back, so that a step makes a few large calls instead of one per parameter.

use candle_core::{DType, Tensor};

use retort_core::Result;

use super::Collective;

/// `grads` averaged over the ranks of `comm`, each with its shape and dtype.
pub fn average(comm: &dyn Collective, grads: Vec<Tensor>, bucket_bytes: usize) -> Result<Vec<Tensor>> {
    let ranks = comm.size() as f64;
    let mut averaged = Vec::with_capacity(grads.len());
    for bucket in buckets(&grads, bucket_bytes) {
        let members = &grads[bucket];
        let flat: Vec<Tensor> = members
            .iter()
            .map(|g| g.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let joined = if flat.len() == 1 {
            flat[0].clone()
        } else {
            Tensor::cat(&flat, 0)?
        };
        let summed = comm.all_reduce_sum(&joined)?;
        let mean = (summed / ranks)?;
        let mut offset = 0;
        for g in members {
            let n = g.elem_count();
            averaged.push(mean.narrow(0, offset, n)?.reshape(g.shape())?.to_dtype(g.dtype())?);
            offset += n;
        }
    }
    Ok(averaged)
}

/// Consecutive ranges of `grads` of at most `bucket_bytes` of f32 each (a larger gradient is a
/// bucket of its own).
fn buckets(grads: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, g) in grads.iter().enumerate() {
        let size = g.elem_count() * 4;
        if i > start && bytes + size > bucket_bytes {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < grads.len() {
        ranges.push(start..grads.len());
    }
    ranges
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::super::local;
    use super::*;

    fn tensors(sizes: &[usize]) -> Vec<Tensor> {
        sizes
            .iter()
            .map(|&n| Tensor::zeros(n, DType::F32, &Device::Cpu).expect("zeros"))
            .collect()
    }

    #[test]
    fn buckets_cover_every_gradient_in_order_within_the_size() {
        let g = tensors(&[10, 10, 30, 5, 5, 100, 1]);
        // 40-element buckets (160 bytes): [10, 10], [30, 5, 5], [100], [1]
        assert_eq!(buckets(&g, 160), vec![0..2, 2..5, 5..6, 6..7]);
        assert_eq!(buckets(&g, 156), vec![0..2, 2..4, 4..5, 5..6, 6..7]);
        assert_eq!(buckets(&g, usize::MAX), vec![0..7]);
        assert!(buckets(&[], 160).is_empty());
    }

    /// Three ranks with different gradients (two shapes, one f64) all end with their mean, in
    /// the gradients' shapes and dtypes, whatever the bucket size.
    #[test]
    fn every_rank_gets_the_mean_in_shape() {
        for bucket_bytes in [4, 40, 1 << 20] {
            let results = local::run(3, move |comm| {
                let r = comm.rank() as f32;
                let a = Tensor::new(&[[1.0f32 + r, 2.0], [3.0, 4.0 * r]], &Device::Cpu)?;
                let b = Tensor::new(&[10.0f64 * r as f64, -1.0, 0.5], &Device::Cpu)?;
                let avg = average(comm, vec![a, b], bucket_bytes)?;
                Ok((avg[0].to_vec2::<f32>()?, avg[1].to_vec1::<f64>()?, avg[1].dtype()))
            });
            for (a, b, dtype) in results {
                assert_eq!(a, vec![vec![2.0, 2.0], vec![3.0, 4.0]]);
                assert_eq!(b, vec![10.0, -1.0, 0.5]);
                assert_eq!(dtype, DType::F64);
            }
        }
    }
}
