//! Row plumbing shared by the fused kernels: contiguous slices out of candle's CPU storage,
//! the `[rows, width]` view of a `[.., width]` tensor, and rows spread over the rayon pool.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Shape};
use rayon::prelude::*;

use super::fastmath::Real;
use super::raw::output_vec;

/// The contiguous elements of `l` inside `s` as `T`, or an error naming `what`.
pub fn slice<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    match T::slice(s) {
        Some(v) => Ok(&v[start..end]),
        None => bail!("{what}: expected {:?}, got {:?}", T::DTYPE, s.dtype()),
    }
}

/// The contiguous elements of `l` inside `s` as `T`, writable, or an error naming `what`.
pub fn slice_mut<'a, T: Real>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    let dtype = s.dtype();
    match T::slice_mut(s) {
        Some(v) => Ok(&mut v[start..end]),
        None => bail!("{what}: expected {:?}, got {dtype:?}", T::DTYPE),
    }
}

/// The contiguous `u32` elements of `l` inside `s`.
pub fn slice_u32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{what}: expected a contiguous tensor")
    };
    match s {
        CpuStorage::U32(v) => Ok(&v[start..end]),
        other => bail!("{what}: expected u32, got {:?}", other.dtype()),
    }
}

/// Runs `f32_body` when every storage in `inputs` is f32, `f64_body` when every one is f64, and
/// otherwise fails naming `op` (the dtype dispatch of every kernel; integer inputs such as token
/// ids stay out of `inputs`, and storages read with [`slice()`] are checked there as well).
pub fn by_dtype<R>(
    op: &str,
    inputs: &[&CpuStorage],
    f32_body: impl FnOnce() -> Result<R>,
    f64_body: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let all = |d: DType| !inputs.is_empty() && inputs.iter().all(|s| s.dtype() == d);
    if all(DType::F32) {
        f32_body()
    } else if all(DType::F64) {
        f64_body()
    } else {
        let dtypes: Vec<DType> = inputs.iter().map(|s| s.dtype()).collect();
        bail!("{op}: expected f32 or f64 inputs of one dtype, got {dtypes:?}")
    }
}

/// `(rows, width)` of a tensor whose last dim is `width`.
pub fn rows_width(shape: &Shape) -> Result<(usize, usize)> {
    let dims = shape.dims();
    let Some(&width) = dims.last() else {
        bail!("expected a tensor of rank >= 1")
    };
    if width == 0 {
        bail!("expected a non-empty last dim")
    }
    Ok((shape.elem_count() / width, width))
}

/// `rows` copies of `row` (a bias), each added to the matching row of `base` when given (a
/// residual), written on the rayon pool: the starting value of a product accumulated onto it.
pub fn repeat_rows<T: Real>(base: Option<&[T]>, row: &[T], rows: usize) -> Vec<T> {
    let n = row.len();
    let mut out = output_vec(rows * n);
    let min = (16_384 / n.max(1)).max(1);
    match base {
        Some(base) => out.par_chunks_mut(n).with_min_len(min).enumerate().for_each(|(r, o)| {
            for ((o, &x), &b) in o.iter_mut().zip(&base[r * n..(r + 1) * n]).zip(row) {
                *o = x + b;
            }
        }),
        None => out
            .par_chunks_mut(n)
            .with_min_len(min)
            .for_each(|o| o.copy_from_slice(row)),
    }
    out
}

/// `shape` with its last dim replaced by `width`.
pub fn with_last(shape: &Shape, width: usize) -> Shape {
    let mut d = shape.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = width;
    }
    Shape::from(d)
}

/// Calls `f(row, out_row)` for every `width`-wide row of `out`, rows spread over the rayon
/// pool; `cost` (elements touched per row) sizes the work items so that tiny rows are batched.
pub fn for_rows<T: Send>(out: &mut [T], width: usize, cost: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let min_len = (32_768 / cost.max(1)).max(1);
    out.par_chunks_mut(width)
        .enumerate()
        .with_min_len(min_len)
        .for_each(|(r, o)| f(r, o));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_dtype_runs_the_body_of_the_common_float_dtype_and_names_the_op_otherwise() {
        let (a, b) = (CpuStorage::F32(vec![1.0]), CpuStorage::F32(vec![2.0]));
        let c = CpuStorage::F64(vec![3.0]);
        let pick = |inputs: &[&CpuStorage]| by_dtype("op-x", inputs, || Ok(32), || Ok(64));
        assert_eq!(pick(&[&a, &b]).expect("f32"), 32);
        assert_eq!(pick(&[&c]).expect("f64"), 64);
        let err = pick(&[&a, &c]).expect_err("mixed").to_string();
        assert!(
            err.contains("op-x") && err.contains("F32") && err.contains("F64"),
            "{err}"
        );
        let ids = CpuStorage::U32(vec![1]);
        assert!(pick(&[&ids]).is_err());
        assert!(pick(&[]).is_err());
    }
}
