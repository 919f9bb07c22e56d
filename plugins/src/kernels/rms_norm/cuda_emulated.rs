//! `rms_norm.cu` on the CPU emulation: the forward and the backward (`dx`, and `dw` through the
//! per-slice partials) in every dtype against the fused CPU op in f64 on the same rounded
//! inputs.

use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::{slices, Grid, SLICE_ROWS};

const EPS: f64 = 1e-5;

/// `(y, dx, dw)` of the kernels on `rows x d` inputs, with `slice_rows` rows per `dw` slice.
fn kernels<T: Element>(x: &[f64], w: &[f64], gy: &[f64], d: usize, slice_rows: usize) -> [Vec<f64>; 3] {
    let rows = x.len() / d;
    let (xs, ws, gys) = (buffer::<T>(x), buffer::<T>(w), buffer::<T>(gy));
    let name = |base: &str| format!("{base}_{}", T::SUFFIX);
    let grid = Grid::rows(rows, d).expect("grid");
    let (di, ri, si) = (Arg::I32(d as i32), Arg::I32(rows as i32), Arg::I32(slice_rows as i32));
    let mut y = vec![T::default(); rows * d];
    launch(
        &name("rms_fwd"),
        &grid,
        &[Arg::input(&xs), Arg::input(&ws), Arg::output(&mut y), di, Arg::F64(EPS)],
    );
    let mut dx = vec![T::default(); rows * d];
    let mut rs = vec![T::Acc::default(); rows];
    let args = [
        Arg::input(&xs),
        Arg::input(&ws),
        Arg::input(&gys),
        Arg::output(&mut dx),
        Arg::output(&mut rs),
        di,
        Arg::F64(EPS),
    ];
    launch(&name("rms_bwd"), &grid, &args);
    let n_slices = slices(rows, slice_rows);
    let mut partials = vec![T::Acc::default(); n_slices * d];
    let grid = Grid::column_partials(rows, d, slice_rows).expect("grid");
    let args = [
        Arg::input(&xs),
        Arg::input(&gys),
        Arg::input(&rs),
        Arg::output(&mut partials),
        ri,
        di,
        si,
    ];
    launch(&name("rms_dw_partial"), &grid, &args);
    let mut dw = vec![T::default(); d];
    let grid = Grid::column_finish(d).expect("grid");
    let args = [
        Arg::input(&partials),
        Arg::output(&mut dw),
        Arg::I32(n_slices as i32),
        di,
    ];
    launch(&name("rms_dw_finish"), &grid, &args);
    [widen(&y), widen(&dx), widen(&dw)]
}

fn check<T: Element>(rows: usize, d: usize, slice_rows: usize) {
    let x = rounded::<T>(&noise(rows * d, 1, 3.0));
    let w = rounded::<T>(&noise(d, 2, 1.5));
    let gy = rounded::<T>(&noise(rows * d, 3, 1.0));
    let [y, dx, dw] = kernels::<T>(&x, &w, &gy, d, slice_rows);
    let f = |t: &[candle_core::Tensor]| super::rms_norm(&t[0], &t[1], EPS);
    let (ry, rg) = reference(&f, &[(&x, &[rows, d]), (&w, &[d])], &gy);
    let what = format!("rms norm {rows}x{d}");
    assert_close::<T>(&format!("{what} y"), &y, &ry);
    assert_close::<T>(&format!("{what} dx"), &dx, &rg[0]);
    assert_close::<T>(&format!("{what} dw"), &dw, &rg[1]);
}

fn check_all<T: Element>() {
    // Odd widths, one narrower than a warp, one wide enough for 256 threads; several slices,
    // the last short; single rows and columns.
    for (rows, d, slice_rows) in [
        (13, 300, 4),
        (5, 2_100, 2),
        (1, 1, SLICE_ROWS),
        (9, 7, 3),
        (3, 33, SLICE_ROWS),
    ] {
        check::<T>(rows, d, slice_rows);
    }
}

#[test]
fn the_kernels_match_the_cpu_in_f32() {
    check_all::<f32>();
}

#[test]
fn the_kernels_match_the_cpu_in_f64() {
    check_all::<f64>();
}

#[test]
fn the_kernels_match_the_cpu_in_f16() {
    check_all::<f16>();
}

#[test]
fn the_kernels_match_the_cpu_in_bf16() {
    check_all::<bf16>();
}

#[test]
fn no_rows_give_a_zero_weight_gradient() {
    let [_, _, dw] = kernels::<f32>(&[], &noise(5, 2, 1.0), &[], 5, SLICE_ROWS);
    assert_eq!(dw, vec![0.0; 5]);
}
