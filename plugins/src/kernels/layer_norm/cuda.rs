//! The CUDA LayerNorm: `layer_norm.cu`, one block per row, f32/f64/f16/bf16; row statistics in
//! f32 (f64 for f64); `dw` and `db` summed per slice of rows, then over the slices in order.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use crate::kernels::cpu::rows::rows_width;
use crate::kernels::cuda::{
    by_element_dtype, by_float_dtype, kernel, launch, output, rows_config, view, width, ColumnSums, LAYER_NORM,
};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// `(rows, d)` of `x` (`st[0]`), checked against the `[d]` vector `st[1]` (weight) and
/// `st[2]` (bias; for the backward the gradient, of `x`'s shape), all of one dtype.
fn sizes(what: &str, st: [Arg; 3], third_like_x: bool) -> Result<(usize, usize)> {
    let (rows, d) = rows_width(st[0].1.shape())?;
    let third_ok = if third_like_x {
        st[2].1.shape() == st[0].1.shape()
    } else {
        st[2].1.shape().dims() == [d]
    };
    let dtypes_ok = st.iter().all(|(s, _)| s.dtype() == st[0].0.dtype());
    if st[1].1.shape().dims() != [d] || !third_ok || !dtypes_ok {
        bail!(
            "{what}: operands {:?}, {:?}, {:?} ({:?}, {:?}, {:?}) do not fit",
            st[0].1.shape(),
            st[1].1.shape(),
            st[2].1.shape(),
            st[0].0.dtype(),
            st[1].0.dtype(),
            st[2].0.dtype()
        )
    }
    Ok((rows, d))
}

/// The forward on `(x, weight, bias)`.
pub(super) fn fwd(eps: f64, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    sizes("fused-layer-norm", st, false)?;
    let out = by_element_dtype!(st[0].0.dtype(), "fused-layer-norm", fwd_typed(eps, st))?;
    Ok((out, st[0].1.shape().clone()))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(eps: f64, st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let (rows, d) = rows_width(st[0].1.shape())?;
    let xs = view::<T>(st[0].0, st[0].1, "x")?;
    let ws = view::<T>(st[1].0, st[1].1, "weight")?;
    let bs = view::<T>(st[2].0, st[2].1, "bias")?;
    let out = output::<T>(dev, rows * d)?;
    let d_arg = width(d)?;
    launch!(
        dev,
        LAYER_NORM,
        kernel("ln_fwd", st[0].0.dtype())?,
        rows_config(rows, d)?,
        [&xs, &ws, &bs, &out, &d_arg, &eps]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `(x, weight, gy)`: `dx` rows, then a `dw` row and a `db` row
/// (`[rows + 2, d]`).
pub(super) fn bwd(eps: f64, st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    let (rows, d) = sizes("fused-layer-norm-grad", st, true)?;
    let out = by_float_dtype!(st[0].0.dtype(), "fused-layer-norm-grad", bwd_typed(eps, st))?;
    Ok((out, Shape::from((rows + 2, d))))
}

fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(eps: f64, st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let (rows, d) = rows_width(st[0].1.shape())?;
    let xs = view::<T>(st[0].0, st[0].1, "x")?;
    let ws = view::<T>(st[1].0, st[1].1, "weight")?;
    let gys = view::<T>(st[2].0, st[2].1, "grad")?;
    let mut out = output::<T>(dev, (rows + 2) * d)?;
    let stats = output::<A>(dev, 2 * rows.max(1))?;
    let d_arg = width(d)?;
    let dtype = st[0].0.dtype();
    launch!(
        dev,
        LAYER_NORM,
        kernel("ln_bwd", dtype)?,
        rows_config(rows, d)?,
        [&xs, &ws, &gys, &out, &stats, &d_arg, &eps]
    );
    let sums = ColumnSums::new(rows, d)?;
    let partials = output::<A>(dev, sums.partial_len(2, d))?;
    let rows_arg = width(rows)?;
    launch!(
        dev,
        LAYER_NORM,
        kernel("ln_dwb_partial", dtype)?,
        sums.partials,
        [&xs, &gys, &stats, &partials, &rows_arg, &d_arg, &sums.slice_rows]
    );
    {
        let mut dwb = out.slice_mut(rows * d..);
        launch!(
            dev,
            LAYER_NORM,
            kernel("ln_dwb_finish", dtype)?,
            sums.finish,
            [&partials, &mut dwb, &sums.slices, &d_arg]
        );
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
