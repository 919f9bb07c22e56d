//! What the kernels' CUDA implementations share (feature `cuda`): the PTX modules compiled from
//! each op's `.cu` file by `plugins/build.rs`, the launch (in [`raw`]), and the plumbing every
//! `cuda.rs` needs (operand views, kernel names by dtype, the one-block-per-row grid).
//!
//! The kernels are written for `compute_80` (portable PTX that the driver compiles for the GPU
//! at load: Ampere, Hopper and later) and launched on candle's stream, so they are ordered with
//! candle's own ops. `common.cuh` holds the device code they share: conversions (math in f32,
//! f64 for f64 storage), fixed-order warp/block reductions (no atomics: results do not depend
//! on scheduling) and the online log-sum-exp.

mod raw;
#[cfg(test)]
mod tests;

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, DType, Layout, Result};

use super::grid::{int, slices, Grid, SLICE_ROWS};

pub(crate) use raw::{address_table, launch, output, update_group_in_place, MAX_GROUP};

/// The generated `pub const NAME: &str` PTX of every `.cu` file of the kernels.
#[allow(missing_docs)]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// A PTX module: its name in candle's module cache and its text.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Module {
    /// Unique name in the device's module cache.
    pub name: &'static str,
    /// The PTX.
    pub ptx: &'static str,
}

/// `divergence/divergence.cu`.
pub(crate) const DIVERGENCE: Module = Module {
    name: "retort-divergence",
    ptx: ptx::DIVERGENCE,
};
/// `topk_divergence/topk_divergence.cu`.
pub(crate) const TOPK_DIVERGENCE: Module = Module {
    name: "retort-topk-divergence",
    ptx: ptx::TOPK_DIVERGENCE,
};
/// `cross_entropy/cross_entropy.cu`.
pub(crate) const CROSS_ENTROPY: Module = Module {
    name: "retort-cross-entropy",
    ptx: ptx::CROSS_ENTROPY,
};
/// `adamw/adamw.cu`.
pub(crate) const ADAMW: Module = Module {
    name: "retort-adamw",
    ptx: ptx::ADAMW,
};

/// `attention/attention.cu`.
pub(crate) const ATTENTION: Module = Module {
    name: "retort-attention",
    ptx: ptx::ATTENTION,
};
/// `attention/attention_mma.cu`: the tensor-core forward.
pub(crate) const ATTENTION_MMA: Module = Module {
    name: "retort-attention-mma",
    ptx: ptx::ATTENTION_MMA,
};
/// `attention/attention_mma_bwd.cu`: the tensor-core backward.
pub(crate) const ATTENTION_MMA_BWD: Module = Module {
    name: "retort-attention-mma-bwd",
    ptx: ptx::ATTENTION_MMA_BWD,
};
/// `rope/rope.cu`.
pub(crate) const ROPE: Module = Module {
    name: "retort-rope",
    ptx: ptx::ROPE,
};

/// `rms_norm/rms_norm.cu`.
pub(crate) const RMS_NORM: Module = Module {
    name: "retort-rms-norm",
    ptx: ptx::RMS_NORM,
};

/// `swiglu/swiglu.cu`.
pub(crate) const SWIGLU: Module = Module {
    name: "retort-swiglu",
    ptx: ptx::SWIGLU,
};

/// `bias/bias.cu`.
pub(crate) const BIAS: Module = Module {
    name: "retort-bias",
    ptx: ptx::BIAS,
};

/// `gelu/gelu.cu`.
pub(crate) const GELU: Module = Module {
    name: "retort-gelu",
    ptx: ptx::GELU,
};

/// `layer_norm/layer_norm.cu`.
pub(crate) const LAYER_NORM: Module = Module {
    name: "retort-layer-norm",
    ptx: ptx::LAYER_NORM,
};

/// `softmax/softmax.cu`.
pub(crate) const SOFTMAX: Module = Module {
    name: "retort-softmax",
    ptx: ptx::SOFTMAX,
};

/// Every module, for the tests.
#[cfg(test)]
pub(crate) const MODULES: [Module; 14] = [
    DIVERGENCE,
    TOPK_DIVERGENCE,
    CROSS_ENTROPY,
    ADAMW,
    ATTENTION,
    ATTENTION_MMA,
    ATTENTION_MMA_BWD,
    ROPE,
    RMS_NORM,
    SWIGLU,
    BIAS,
    GELU,
    LAYER_NORM,
    SOFTMAX,
];

/// `$f::<T, A>(args..)` for the logits' dtype `$dtype`: `T` the element type, `A` the type of
/// the row statistics (f32, f64 for f64); an error naming `$what` for other dtypes.
macro_rules! by_float_dtype {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32, f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64, f64>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16, f32>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16, f32>($($arg),*),
            other => candle_core::bail!("{}: no CUDA kernel for {other:?}", $what),
        }
    };
}
pub(crate) use by_float_dtype;

/// `$f::<T>(args..)` for the element type `T` of `$dtype` (f32, f64, f16, bf16): the kernels
/// that keep no statistics; an error naming `$what` for other dtypes.
macro_rules! by_element_dtype {
    ($dtype:expr, $what:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $dtype {
            candle_core::DType::F32 => $f::<f32>($($arg),*),
            candle_core::DType::F64 => $f::<f64>($($arg),*),
            candle_core::DType::F16 => $f::<half::f16>($($arg),*),
            candle_core::DType::BF16 => $f::<half::bf16>($($arg),*),
            other => candle_core::bail!("{}: no CUDA kernel for {other:?}", $what),
        }
    };
}
pub(crate) use by_element_dtype;

/// The name of `base`'s instance for `dtype` (`divergence_fwd_bf16`, ...).
pub(crate) fn kernel(base: &str, dtype: DType) -> Result<String> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("{base}: no CUDA kernel for {other:?}"),
    };
    Ok(format!("{base}_{suffix}"))
}

/// One block per row of `width` elements ([`Grid::rows`]).
pub(crate) fn rows_config(rows: usize, width: usize) -> Result<LaunchConfig> {
    Ok(config(Grid::rows(rows, width)?))
}

/// An element-wise launch over `n` elements ([`Grid::elements`]).
pub(crate) fn elements_config(n: usize) -> LaunchConfig {
    config(Grid::elements(n))
}

/// The two launches of a sum over `rows` rows per column of `width` columns (weight and bias
/// gradients): the per-slice partials ([`Grid::column_partials`], [`SLICE_ROWS`] rows a
/// slice), then their sum in slice order ([`Grid::column_finish`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColumnSums {
    /// The launch of the partials.
    pub partials: LaunchConfig,
    /// The launch of the final sums.
    pub finish: LaunchConfig,
    /// Slices (rows of partials).
    pub slices: i32,
    /// Rows per slice, as the kernels' `int`.
    pub slice_rows: i32,
}

impl ColumnSums {
    /// The launches for `rows` x `width`.
    pub fn new(rows: usize, width: usize) -> Result<Self> {
        Ok(ColumnSums {
            partials: config(Grid::column_partials(rows, width, SLICE_ROWS)?),
            finish: config(Grid::column_finish(width)?),
            slices: int(slices(rows, SLICE_ROWS))?,
            slice_rows: int(SLICE_ROWS)?,
        })
    }

    /// Elements of the partials buffer for `k` sums per column of `width` columns (at least
    /// one: no zero-sized allocation).
    pub fn partial_len(&self, k: usize, width: usize) -> usize {
        (self.slices as usize * k * width).max(1)
    }
}

/// `grid` as cudarc's launch configuration.
pub(crate) fn config(grid: Grid) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid.blocks,
        block_dim: grid.threads,
        shared_mem_bytes: grid.shared_bytes,
    }
}

/// The row width as the kernels' `int`.
pub(crate) fn width(v: usize) -> Result<i32> {
    int(v)
}

/// The contiguous elements of operand `what` as a view of its storage.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(slice.slice(start..end)),
        None => bail!("{what}: expected a contiguous tensor"),
    }
}
