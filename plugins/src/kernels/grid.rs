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

    /// An element-wise grid-stride launch over `n` elements: blocks of 256 threads, one
    /// element per thread up to [`MAX_ELEMENT_BLOCKS`] blocks (then each thread strides).
    pub fn elements(n: usize) -> Self {
        Grid {
            blocks: (n.div_ceil(256).min(MAX_ELEMENT_BLOCKS) as u32, 1, 1),
            threads: (256, 1, 1),
            shared_bytes: 0,
        }
    }

    /// The per-slice column sums of `rows` rows of `width` columns (`column_partials` of
    /// `common.cuh`): 256 columns per block in x, one slice of `slice_rows` rows per block in
    /// y. No rows or no columns, no blocks.
    pub fn column_partials(rows: usize, width: usize, slice_rows: usize) -> Result<Self> {
        let slices = u32::try_from(slices(rows, slice_rows)).or_else(|_| bail!("{rows} rows exceed one CUDA grid"))?;
        Ok(Grid {
            blocks: (Self::column_blocks(width)?, slices, 1),
            threads: (256, 1, 1),
            shared_bytes: 0,
        })
    }

    /// The sum of the slices' partials per column (`column_finish` of `common.cuh`): one
    /// thread per column, 256 per block.
    pub fn column_finish(width: usize) -> Result<Self> {
        Ok(Grid {
            blocks: (Self::column_blocks(width)?, 1, 1),
            threads: (256, 1, 1),
            shared_bytes: 0,
        })
    }

    fn column_blocks(width: usize) -> Result<u32> {
        u32::try_from(width.div_ceil(256)).or_else(|_| bail!("{width} columns exceed one CUDA grid"))
    }

    /// Whether the grid has no block (nothing to launch: CUDA refuses an empty grid).
    #[cfg(test)]
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

/// Blocks of an element-wise launch at most (each thread strides beyond).
pub(crate) const MAX_ELEMENT_BLOCKS: usize = 8_192;

/// Rows per slice of the column sums (weight and bias gradients): each slice's sums are one
/// row of partials, summed in slice order after. A fixed number, so the order of the sums, and
/// the result, depends on the shape only.
pub(crate) const SLICE_ROWS: usize = 64;

/// Slices of `slice_rows` rows covering `rows` rows (the last may be short).
pub(crate) fn slices(rows: usize, slice_rows: usize) -> usize {
    rows.div_ceil(slice_rows.max(1))
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
    fn column_sums_have_a_block_row_per_slice() {
        let g = Grid::column_partials(130, 300, 64).expect("grid");
        assert_eq!((g.blocks, g.threads), ((2, 3, 1), (256, 1, 1)));
        assert!(Grid::column_partials(0, 300, 64).is_ok_and(|g| g.is_empty()));
        assert_eq!(Grid::column_finish(257).map(|g| g.blocks).ok(), Some((2, 1, 1)));
        assert_eq!(Grid::elements(1 << 30).blocks.0 as usize, MAX_ELEMENT_BLOCKS);
        assert!(Grid::elements(0).is_empty());
    }

    #[test]
    fn wider_rows_get_more_threads() {
        let t = |w| Grid::rows(10, w).map(|g| g.threads.0).ok();
        assert_eq!((t(100), t(4_096), t(50_000)), (Some(128), Some(256), Some(512)));
        assert!(Grid::rows(0, 10).is_ok_and(|g| g.is_empty()));
    }
}
