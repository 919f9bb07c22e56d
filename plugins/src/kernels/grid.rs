//! The launch shapes of the CUDA kernels, apart from any CUDA crate: what `cuda.rs` launches on
//! a GPU and what the CPU emulation (feature `cuda-emulate`) runs in tests are one computation.

use candle_core::{bail, Result};

/// A launch's grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grid {
    /// Blocks in x, y, z.
    pub blocks: (u32, u32, u32),
    /// Threads per block in x, y, z.
    pub threads: (u32, u32, u32),
    /// Bytes of dynamic shared memory per block.
    pub shared_bytes: u32,
}

impl Grid {
    /// One block per row of `width` elements: 128 threads for narrow rows, up to 512 for wide
    /// ones. No rows, no blocks: such a launch is skipped ([`Grid::is_empty`]).
    pub fn rows(rows: usize, width: usize) -> Result<Self> {
        let Ok(blocks) = u32::try_from(rows) else {
            bail!("{rows} rows exceed one CUDA grid")
        };
        let threads = match width {
            w if w >= 16_384 => 512,
            w if w >= 2_048 => 256,
            _ => 128,
        };
        Ok(Grid {
            blocks: (blocks, 1, 1),
            threads: (threads, 1, 1),
            shared_bytes: 0,
        })
    }

    /// Whether the grid has no block (nothing to launch: CUDA refuses an empty grid).
    pub fn is_empty(&self) -> bool {
        self.blocks.0 == 0 || self.blocks.1 == 0 || self.blocks.2 == 0
    }

    /// The grid of a group kernel: `count` rows of up to `max_blocks` blocks of 256 threads, as
    /// many as the longest tensor (`longest` elements) fills.
    pub fn group(count: usize, longest: usize, max_blocks: usize) -> Self {
        Grid {
            blocks: (longest.div_ceil(256).clamp(1, max_blocks) as u32, count as u32, 1),
            threads: (256, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// A row width, count or offset as the kernels' `int`.
pub(crate) fn int(v: usize) -> Result<i32> {
    i32::try_from(v).or_else(|_| bail!("{v} exceeds the CUDA kernels' int range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_grid_has_a_row_per_tensor_and_blocks_for_the_longest() {
        let g = Grid::group(3, 1_000, 64);
        assert_eq!((g.blocks, g.threads), ((4, 3, 1), (256, 1, 1)));
        assert_eq!(Grid::group(2, 10_000_000, 64).blocks, (64, 2, 1));
        assert_eq!(Grid::group(1, 0, 64).blocks, (1, 1, 1));
    }

    #[test]
    fn wider_rows_get_more_threads() {
        let t = |w| Grid::rows(10, w).map(|g| g.threads.0).ok();
        assert_eq!((t(100), t(4_096), t(50_000)), (Some(128), Some(256), Some(512)));
        assert!(Grid::rows(0, 10).is_ok_and(|g| g.is_empty()));
    }
}
