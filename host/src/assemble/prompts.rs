//! Prompts given by the data (a `prompt_field` of `jsonl`) rather than cut from the start of a
//! training window: [`PromptPool`].
//!
//! A batch is decoded together, so its prompts must have one length. The pool keeps the prompts
//! in order of length; a batch takes consecutive prompts of that order (similar lengths) and
//! cuts each from the left to the shortest of them, keeping the end of every prompt (where a
//! chat template puts the turn the model answers). Each prompt is first cut to its last
//! `max_tokens` tokens, so that prompt and completion fit the window.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tokenized prompts in order of length.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPool {
    sorted: Vec<Vec<u32>>,
}

impl PromptPool {
    /// The non-empty `prompts`, each cut to its last `max_tokens` tokens; `None` when none is
    /// left.
    pub fn new(prompts: &[Vec<u32>], max_tokens: usize) -> Option<Self> {
        let mut sorted: Vec<Vec<u32>> = prompts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| p[p.len().saturating_sub(max_tokens)..].to_vec())
            .collect();
        // Stable: prompts of one length keep the data's order.
        sorted.sort_by_key(Vec::len);
        (!sorted.is_empty() && max_tokens > 0).then_some(PromptPool { sorted })
    }

    /// Prompts held.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether the pool is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Mean length of the prompts, in tokens.
    pub fn mean_len(&self) -> f64 {
        self.sorted.iter().map(Vec::len).sum::<usize>() as f64 / self.len() as f64
    }

    /// `rows` prompts from position `start` of the length order (wrapping around), each cut from
    /// the left to the shortest of them.
    pub fn group(&self, start: usize, rows: usize) -> Vec<Vec<u32>> {
        let n = self.len();
        let picked: Vec<&Vec<u32>> = (0..rows).map(|i| &self.sorted[(start + i) % n]).collect();
        let shortest = picked.iter().map(|p| p.len()).min().unwrap_or(0);
        picked.iter().map(|p| p[p.len() - shortest..].to_vec()).collect()
    }

    /// `count` prompts (at most all) spread evenly over the length order, so that short and
    /// long ones are both asked, in batches of `batch` consecutive ones, each batch cut from
    /// the left to its shortest prompt.
    pub fn spread(&self, count: usize, batch: usize) -> Vec<Vec<Vec<u32>>> {
        let (n, count) = (self.len(), count.min(self.len()));
        let picked: Vec<&Vec<u32>> = (0..count).map(|i| &self.sorted[i * n / count]).collect();
        picked
            .chunks(batch.max(1))
            .map(|c| {
                let shortest = c.iter().map(|p| p.len()).min().unwrap_or(0);
                c.iter().map(|p| p[p.len() - shortest..].to_vec()).collect()
            })
            .collect()
    }

    /// [`Self::group`] from a start drawn uniformly by `seed` among the starts whose group does
    /// not wrap around (any start when the pool has fewer than `rows` prompts).
    pub fn draw(&self, rows: usize, seed: u64) -> Vec<Vec<u32>> {
        let starts = self.len().saturating_sub(rows) + 1;
        let start = ChaCha8Rng::seed_from_u64(seed).random_range(0..starts);
        self.group(start, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PromptPool {
        let prompts = vec![
            vec![1, 2, 3, 4, 5],
            vec![],
            vec![6, 7],
            vec![8, 9, 10],
            vec![11, 12, 13, 14],
        ];
        PromptPool::new(&prompts, 4).expect("pool")
    }

    #[test]
    fn prompts_are_cut_to_their_end_and_kept_in_length_order() {
        let p = pool();
        assert_eq!(p.len(), 4, "the empty prompt is dropped");
        // Of one length, prompts keep the data's order.
        assert_eq!(p.group(0, 4), vec![vec![6, 7], vec![9, 10], vec![4, 5], vec![13, 14]]);
        assert_eq!(p.group(2, 2), vec![vec![2, 3, 4, 5], vec![11, 12, 13, 14]]);
        assert!((p.mean_len() - 3.25).abs() < 1e-12);
        assert!(PromptPool::new(&[vec![], vec![]], 4).is_none());
        assert!(PromptPool::new(&[vec![1]], 0).is_none());
    }

    #[test]
    fn draws_are_groups_of_one_length_fixed_by_the_seed() {
        let p = pool();
        for seed in 0..50 {
            let g = p.draw(3, seed);
            assert_eq!(g.len(), 3);
            assert!(g.iter().all(|x| x.len() == g[0].len() && !x.is_empty()));
            assert_eq!(g, p.draw(3, seed), "seed {seed}");
        }
        let starts: std::collections::BTreeSet<Vec<Vec<u32>>> = (0..50).map(|s| p.draw(3, s)).collect();
        assert_eq!(starts.len(), 2, "both non-wrapping starts are drawn");
        assert_eq!(p.draw(6, 1).len(), 6, "more rows than prompts: the order wraps");
    }

    #[test]
    fn spread_batches_take_short_and_long_prompts() {
        let p = pool();
        assert_eq!(p.spread(2, 1), vec![vec![vec![6, 7]], vec![vec![2, 3, 4, 5]]]);
        assert_eq!(
            p.spread(9, 3),
            vec![vec![vec![6, 7], vec![9, 10], vec![4, 5]], vec![vec![11, 12, 13, 14]]]
        );
    }
}
