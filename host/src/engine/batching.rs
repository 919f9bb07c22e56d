//! Windows of the token stream as batches: seeded random windows for training (any start, or
//! only starts at multiples of the window length: `train.windows = "aligned"`), fixed
//! consecutive windows for validation. Every batch records where its rows came from
//! ([`retort_core::BatchSource`]), which a teacher reading stored outputs keys by. In a
//! data-parallel run every rank draws the same global batches and keeps its [`Shard`] of rows.

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use retort_core::config::WindowSampling;
use retort_core::{Batch, Error, Result, Split};

use crate::engine::parallel::Shard;

/// Samples training windows uniformly at random; the sequence depends only on the seed, so two
/// trainings with the same seed see the same batches (and the ranks of a data-parallel run
/// the rows of the same global batches).
pub struct TrainBatcher<'a> {
    tokens: &'a [u32],
    /// Rows of a global batch.
    batch_size: usize,
    shard: Shard,
    seq_len: usize,
    sampling: WindowSampling,
    rng: ChaCha8Rng,
    device: Device,
}

impl<'a> TrainBatcher<'a> {
    /// A batcher over `tokens` of global batches of `batch_size` rows, of which it hands the
    /// rows of `shard` (which divides `batch_size`); errors if the stream is shorter than one
    /// window plus its target.
    pub fn new(
        tokens: &'a [u32],
        batch_size: usize,
        seq_len: usize,
        sampling: WindowSampling,
        seed: u64,
        shard: Shard,
        device: &Device,
    ) -> Result<Self> {
        check_len(tokens, seq_len, "training split")?;
        if !batch_size.is_multiple_of(shard.ranks) {
            return Err(Error::config(
                "train.batch_size",
                format!("is {batch_size}, not a multiple of the {} ranks", shard.ranks),
            ));
        }
        Ok(TrainBatcher {
            tokens,
            batch_size,
            shard,
            seq_len,
            sampling,
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        })
    }

    /// Position in the random stream (saved in checkpoints).
    pub fn stream_pos(&self) -> u128 {
        self.rng.get_word_pos()
    }

    /// Continues the stream from a saved position.
    pub fn set_stream_pos(&mut self, pos: u128) {
        self.rng.set_word_pos(pos);
    }

    /// This rank's rows of the next global batch.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let global = self.next_starts();
        let starts = self.shard.rows(&global);
        Batch::from_windows(self.tokens, Split::Train, &starts, self.seq_len, &self.device)
    }

    /// Draws `n` batches without building them: the stream moves on as if they had been.
    pub fn skip(&mut self, n: usize) {
        for _ in 0..n {
            self.next_starts();
        }
    }

    /// The start offsets of the next global batch's windows.
    fn next_starts(&mut self) -> Vec<usize> {
        match self.sampling {
            WindowSampling::Random => {
                let max_start = self.tokens.len() - self.seq_len - 1;
                (0..self.batch_size)
                    .map(|_| self.rng.random_range(0..=max_start))
                    .collect()
            }
            WindowSampling::Aligned => {
                let windows = aligned_windows(self.tokens.len(), self.seq_len);
                (0..self.batch_size)
                    .map(|_| self.rng.random_range(0..windows) * self.seq_len)
                    .collect()
            }
        }
    }
}

/// Consecutive non-overlapping validation windows, at most `batches * batch_size` of them.
pub fn val_batches(
    tokens: &[u32],
    batches: usize,
    batch_size: usize,
    seq_len: usize,
    device: &Device,
) -> Result<Vec<Batch>> {
    check_len(tokens, seq_len, "validation split")?;
    let n_windows = aligned_windows(tokens.len(), seq_len)
        .min(batches.saturating_mul(batch_size))
        .max(1);
    let starts: Vec<usize> = (0..n_windows).map(|i| i * seq_len).collect();
    starts
        .chunks(batch_size)
        .map(|chunk| Batch::from_windows(tokens, Split::Val, chunk, seq_len, device))
        .collect()
}

/// Number of windows starting at multiples of `seq_len` whose targets fit in a stream of
/// `len` tokens: window `w` reads `[w * seq_len, (w + 1) * seq_len]` (inputs and the last target).
pub fn aligned_windows(len: usize, seq_len: usize) -> usize {
    len.saturating_sub(1) / seq_len
}

fn check_len(tokens: &[u32], seq_len: usize, what: &str) -> Result<()> {
    if tokens.len() <= seq_len {
        return Err(Error::input(
            what,
            format!(
                "has {} tokens, fewer than one window of train.seq_len = {seq_len} plus its target",
                tokens.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_inputs_shifted_by_one_and_seeded() {
        let toks: Vec<u32> = (0..100).collect();
        let whole = Shard::WHOLE;
        let mut a = TrainBatcher::new(&toks, 4, 8, WindowSampling::Random, 9, whole, &Device::Cpu).expect("b");
        let mut b = TrainBatcher::new(&toks, 4, 8, WindowSampling::Random, 9, whole, &Device::Cpu).expect("b");
        let x = a.next_batch().expect("x");
        let y = b.next_batch().expect("y");
        let xi: Vec<Vec<u32>> = x.input_ids.to_vec2().expect("v");
        let xt: Vec<Vec<u32>> = x.targets.to_vec2().expect("v");
        assert_eq!(xi, y.input_ids.to_vec2::<u32>().expect("v"));
        for (i, t) in xi.iter().zip(&xt) {
            assert!(i.iter().zip(t).all(|(a, b)| a + 1 == *b));
        }
    }

    /// The ranks' rows, in rank order, are the single process's batch, batch after batch; a
    /// batch the ranks do not divide is refused.
    #[test]
    fn shards_partition_the_global_batch_in_order() {
        let toks: Vec<u32> = (0..500).collect();
        let rows = |shard: Shard| {
            let mut b = TrainBatcher::new(&toks, 6, 8, WindowSampling::Random, 3, shard, &Device::Cpu).expect("b");
            (0..3)
                .map(|_| b.next_batch().expect("batch").input_ids.to_vec2::<u32>().expect("v"))
                .collect::<Vec<_>>()
        };
        let whole = rows(Shard::WHOLE);
        let parts: Vec<_> = (0..3).map(|rank| rows(Shard { rank, ranks: 3 })).collect();
        for (step, batch) in whole.iter().enumerate() {
            let joined: Vec<Vec<u32>> = parts.iter().flat_map(|p| p[step].clone()).collect();
            assert_eq!(&joined, batch);
        }
        let four = Shard { rank: 0, ranks: 4 };
        let e = TrainBatcher::new(&toks, 6, 8, WindowSampling::Random, 3, four, &Device::Cpu).err();
        assert!(e.expect("refused").to_string().contains("train.batch_size"));
    }

    #[test]
    fn val_windows_are_consecutive_and_bounded() {
        let toks: Vec<u32> = (0..50).collect();
        let v = val_batches(&toks, 10, 2, 8, &Device::Cpu).expect("v");
        // (50 - 1) / 8 = 6 windows in batches of 2.
        assert_eq!(v.len(), 3);
        assert_eq!(v[1].input_ids.to_vec2::<u32>().expect("v")[0][0], 16);
        assert!(val_batches(&toks[..8], 1, 1, 8, &Device::Cpu).is_err());
    }
}
