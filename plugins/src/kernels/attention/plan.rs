//! The launch plan of `attention.cu`, apart from any CUDA crate (what `cuda.rs` launches on a
//! GPU and what the emulated tests run are one computation): kernel names by head-dim bucket,
//! the grids, and the strides of the `[B, H, T, d]` operands and gradients.

use candle_core::{bail, Layout, Result};

use super::MAX_CUDA_HEAD_DIM;
use crate::kernels::grid::{int, Grid};

/// Threads per block of every attention kernel (`THREADS` in `attention.cu`).
const THREADS: u32 = 128;
/// Query rows per block of `attn_fwd` and `attn_dq` (`Q_ROWS`).
const Q_ROWS: usize = 32;
/// Key rows per block of `attn_dkdv` (`K_ROWS`).
const K_ROWS: usize = 16;
/// Rows of `attn_delta` per block (one warp each).
const DELTA_ROWS: usize = THREADS as usize / 32;
/// Query rows per block of the tensor-core forward `attn_fwd_mma` (`BM` in `attention_mma.cu`).
const MMA_Q_ROWS: usize = 64;
/// The widest head-dim bucket of the tensor-core forward.
const MMA_MAX_BUCKET: usize = 128;
/// The widest head-dim bucket of the tensor-core backward (its dK/dV kernel keeps two `16 x d`
/// f32 accumulators and two `16 x d` operands per warp in registers).
const MMA_BWD_MAX_BUCKET: usize = 128;

/// The backward's two gradient kernels (`attn_delta` runs before either way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backward {
    /// `dq`'s kernel (without the dtype suffix) and grid.
    pub dq: (String, Grid),
    /// `dk` and `dv`'s kernel and grid.
    pub dkdv: (String, Grid),
    /// Whether they are the tensor-core kernels (module `attention_mma_bwd.cu`).
    pub tensor_cores: bool,
}

/// Which forward kernel runs: `attention.cu`'s FMA one or `attention_mma.cu`'s tensor-core one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Forward {
    /// The kernel's name without the dtype suffix (`attn_fwd_d64`, `attn_fwd_mma_d64`).
    pub name: String,
    /// Its grid.
    pub grid: Grid,
    /// Whether it is the tensor-core kernel (module `attention_mma.cu`).
    pub tensor_cores: bool,
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub t: usize,
    pub d: usize,
}

impl Sizes {
    /// Checks what the kernels assume: `H_kv` divides `H`, `1 <= d <= 256`, sizes in the
    /// grid's and the kernels' `int` range.
    pub fn checked(self) -> Result<Self> {
        let Sizes {
            batch,
            heads,
            kv_heads,
            t,
            d,
        } = self;
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            bail!("causal attention: {kv_heads} key/value heads do not divide {heads} query heads")
        }
        if d == 0 || d > MAX_CUDA_HEAD_DIM {
            bail!("causal attention: head dim {d} is outside the CUDA kernels' 1..={MAX_CUDA_HEAD_DIM}")
        }
        if batch > 65_535 || heads > 65_535 {
            bail!("causal attention: batch {batch} or {heads} heads exceed one CUDA grid")
        }
        int(batch * t * heads)?;
        int(t * heads * d)?;
        Ok(self)
    }

    /// The head-dim bucket: the kernels' compile-time width `D >= d`.
    fn bucket(&self) -> usize {
        self.d.next_power_of_two().max(32)
    }

    /// The name (without the dtype suffix) of kernel `base` (`attn_fwd`, `attn_dq`,
    /// `attn_dkdv`) for this head dim: `attn_fwd_d64`.
    pub fn kernel(&self, base: &str) -> String {
        format!("{base}_d{}", self.bucket())
    }

    /// The forward, on tensor cores where `tensor_cores` (bf16/f16 storage, not turned off)
    /// and the head dim is at most 128, else the FMA kernel.
    pub fn forward(&self, tensor_cores: bool) -> Forward {
        if tensor_cores && self.bucket() <= MMA_MAX_BUCKET {
            return Forward {
                name: self.kernel("attn_fwd_mma"),
                grid: grid(self.t.div_ceil(MMA_Q_ROWS), self.heads, self.batch),
                tensor_cores: true,
            };
        }
        Forward {
            name: self.kernel("attn_fwd"),
            grid: self.query_grid(),
            tensor_cores: false,
        }
    }

    /// The backward, on tensor cores where `tensor_cores` and the head dim is at most 128 (one
    /// block per 64 query rows or 64 keys), else the FMA kernels.
    pub fn backward(&self, tensor_cores: bool) -> Backward {
        if tensor_cores && self.bucket() <= MMA_BWD_MAX_BUCKET {
            let tiles = self.t.div_ceil(MMA_Q_ROWS);
            return Backward {
                dq: (self.kernel("attn_dq_mma"), grid(tiles, self.heads, self.batch)),
                dkdv: (self.kernel("attn_dkdv_mma"), grid(tiles, self.kv_heads, self.batch)),
                tensor_cores: true,
            };
        }
        Backward {
            dq: (self.kernel("attn_dq"), self.query_grid()),
            dkdv: (self.kernel("attn_dkdv"), self.key_grid()),
            tensor_cores: false,
        }
    }

    /// `attn_fwd` and `attn_dq`: one block per (query tile, head, batch).
    pub fn query_grid(&self) -> Grid {
        grid(self.t.div_ceil(Q_ROWS), self.heads, self.batch)
    }

    /// `attn_dkdv`: one block per (key tile, kv head, batch).
    pub fn key_grid(&self) -> Grid {
        grid(self.t.div_ceil(K_ROWS), self.kv_heads, self.batch)
    }

    /// `attn_delta`: one warp per (batch, token, head) row.
    pub fn delta_grid(&self) -> Grid {
        grid(self.rows().div_ceil(DELTA_ROWS), 1, 1)
    }

    /// Rows of `y`: `B T H`.
    pub fn rows(&self) -> usize {
        self.batch * self.t * self.heads
    }

    /// The `(q, k, v)` views of a contiguous `qkv [B, T, (H + 2 H_kv) d]` from element
    /// `start`; also the layout of its gradient (from 0).
    pub fn packed(&self, start: usize) -> [Strides; 3] {
        let w = (self.heads + 2 * self.kv_heads) * self.d;
        let at = |col: usize| Strides {
            offset: start + col * self.d,
            b: self.t * w,
            h: self.d,
            t: w,
        };
        [at(0), at(self.heads), at(self.heads + self.kv_heads)]
    }

    /// The flat `dq [B, H, T, d]`, `dk`, `dv [B, H_kv, T, d]` one after the other.
    pub fn flat_grads(&self) -> [Strides; 3] {
        let (t, d) = (self.t, self.d);
        let nq = self.batch * self.heads * t * d;
        let nk = self.batch * self.kv_heads * t * d;
        let dense = |offset: usize, heads: usize| Strides {
            offset,
            b: heads * t * d,
            h: t * d,
            t: d,
        };
        [
            dense(0, self.heads),
            dense(nq, self.kv_heads),
            dense(nq + nk, self.kv_heads),
        ]
    }
}

fn grid(x: usize, y: usize, z: usize) -> Grid {
    Grid {
        blocks: (x as u32, y as u32, z as u32),
        threads: (THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// A strided `[B, H, T, d]` operand: element `(b, h, t, c)` at `offset + b sb + h sh + t st + c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Strides {
    pub offset: usize,
    pub b: usize,
    pub h: usize,
    pub t: usize,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl Strides {
    /// The view of a `[B, H, T, d]` layout whose last stride is 1 (or `d = 1`).
    pub fn of(l: &Layout, what: &str) -> Result<Self> {
        let (dims, s) = (l.dims(), l.stride());
        if dims.len() != 4 || (s[3] != 1 && dims[3] != 1) {
            bail!("causal attention: {what} {dims:?} (strides {s:?}) is not [B, H, T, d] with unit last stride")
        }
        Ok(Strides {
            offset: l.start_offset(),
            b: s[0],
            h: s[1],
            t: s[2],
        })
    }

    /// One past the last element the view reaches for `(batch, heads, t, d)` (0 when empty).
    pub fn end(&self, batch: usize, heads: usize, t: usize, d: usize) -> usize {
        if batch * heads * t * d == 0 {
            return self.offset;
        }
        self.offset + (batch - 1) * self.b + (heads - 1) * self.h + (t - 1) * self.t + d
    }

    /// `(sb, sh, st)` as the kernels' parameters.
    pub fn args(&self) -> [u64; 3] {
        [self.b as u64, self.h as u64, self.t as u64]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_grids() {
        let s = Sizes {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            t: 70,
            d: 24,
        };
        assert_eq!(s.kernel("attn_fwd"), "attn_fwd_d32");
        assert_eq!(Sizes { d: 64, ..s }.kernel("attn_dq"), "attn_dq_d64");
        assert_eq!(Sizes { d: 65, ..s }.kernel("attn_dq"), "attn_dq_d128");
        assert_eq!(Sizes { d: 256, ..s }.kernel("attn_dkdv"), "attn_dkdv_d256");
        assert!(Sizes { d: 257, ..s }.checked().is_err());
        assert!(Sizes { kv_heads: 3, ..s }.checked().is_err());
        assert_eq!(s.query_grid().blocks, (3, 4, 2));
        assert_eq!(s.key_grid().blocks, (5, 2, 2));
        assert_eq!(s.delta_grid().blocks, (140, 1, 1));
        assert!(Sizes { t: 0, ..s }.query_grid().is_empty());
    }

    /// Batch 2, 4 query heads on 2 key/value heads, `t = 130` (three 64-row tiles), `d = 64`.
    fn two_blocks_of_grouped_heads() -> Sizes {
        Sizes {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            t: 130,
            d: 64,
        }
    }

    #[test]
    fn half_storage_runs_the_forward_on_tensor_cores_up_to_head_dim_128() {
        let s = two_blocks_of_grouped_heads();
        let mma = s.forward(true);
        assert_eq!((mma.name.as_str(), mma.tensor_cores), ("attn_fwd_mma_d64", true));
        assert_eq!(mma.grid.blocks, (3, 4, 2));
        assert_eq!(Sizes { d: 24, ..s }.forward(true).name, "attn_fwd_mma_d32");
        assert_eq!(Sizes { d: 128, ..s }.forward(true).name, "attn_fwd_mma_d128");
        let wide = Sizes { d: 200, ..s }.forward(true);
        assert_eq!((wide.name.as_str(), wide.tensor_cores), ("attn_fwd_d256", false));
        let f32_fwd = s.forward(false);
        assert_eq!(
            (f32_fwd.name, f32_fwd.grid),
            ("attn_fwd_d64".to_string(), s.query_grid())
        );
    }

    #[test]
    fn half_storage_runs_the_backward_on_tensor_cores_up_to_head_dim_128() {
        let s = two_blocks_of_grouped_heads();
        let mma = s.backward(true);
        assert!(mma.tensor_cores);
        assert_eq!(mma.dq.0, "attn_dq_mma_d64");
        assert_eq!(mma.dq.1.blocks, (3, 4, 2));
        assert_eq!(mma.dkdv.0, "attn_dkdv_mma_d64");
        assert_eq!(mma.dkdv.1.blocks, (3, 2, 2));
        assert_eq!(Sizes { d: 20, ..s }.backward(true).dkdv.0, "attn_dkdv_mma_d32");
        assert_eq!(Sizes { d: 65, ..s }.backward(true).dq.0, "attn_dq_mma_d128");
        let wide = Sizes { d: 129, ..s }.backward(true);
        assert!(!wide.tensor_cores);
        assert_eq!(wide.dq, ("attn_dq_d256".to_string(), s.query_grid()));
        assert_eq!(s.backward(false).dkdv, ("attn_dkdv_d64".to_string(), s.key_grid()));
    }
}
