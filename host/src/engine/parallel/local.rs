//! An in-process world for tests: `size` threads, each a rank, meeting at a barrier to swap
//! their contributions (the collectives' semantics without a launcher).

use std::sync::{Arc, Barrier, Mutex};

use candle_core::{Device, Tensor};

use retort_core::Result;

use super::Collective;

/// One rank of a group of threads.
pub(crate) struct LocalRank {
    rank: usize,
    size: usize,
    slots: Arc<Mutex<Vec<Vec<f64>>>>,
    barrier: Arc<Barrier>,
}

/// Runs `body` on `size` threads, each with its rank, and returns their results by rank.
pub(crate) fn run<T: Send>(size: usize, body: impl Fn(&dyn Collective) -> Result<T> + Sync) -> Vec<T> {
    let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
    let barrier = Arc::new(Barrier::new(size));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let me = LocalRank {
                    rank,
                    size,
                    slots: slots.clone(),
                    barrier: barrier.clone(),
                };
                let body = &body;
                s.spawn(move || body(&me).expect("rank body"))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

impl LocalRank {
    /// Every rank's `mine`, by rank.
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.slots.lock().expect("slots")[self.rank] = mine;
        self.barrier.wait();
        let all = self.slots.lock().expect("slots").clone();
        self.barrier.wait();
        all
    }

    fn summed(&self, mine: Vec<f64>) -> Vec<f64> {
        let all = self.exchange(mine);
        (0..all[0].len()).map(|i| all.iter().map(|v| v[i]).sum()).collect()
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let mine: Vec<f64> = flat.to_vec1::<f32>()?.into_iter().map(f64::from).collect();
        let sum: Vec<f32> = self.summed(mine).into_iter().map(|v| v as f32).collect();
        Ok(Tensor::from_vec(sum, flat.elem_count(), &Device::Cpu)?)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        values.copy_from_slice(&self.summed(values.to_vec()));
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let bits = f64::from_bits(value);
        Ok(self.exchange(vec![bits]).iter().map(|v| v[0].to_bits()).collect())
    }
    fn barrier(&self) -> Result<()> {
        self.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        panic!("rank {} aborted the group with code {code}", self.rank)
    }
}
