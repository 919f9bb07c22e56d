//! `layer_norm.cu` on the CPU emulation: the forward and the backward (`dx`, and `dw`, `db`
//! through the per-slice partials) in every dtype against the fused CPU op in f64 on the same
//! rounded inputs.

use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::{slices, Grid, SLICE_ROWS};

const EPS: f64 = 1e-5;

/// `(y, dx, dw, db)` of the kernels on `rows x d` inputs, `slice_rows` rows per slice.
fn kernels<T: Element>(x: &[f64], w: &[f64], b: &[f64], gy: &[f64], slice_rows: usize) -> [Vec<f64>; 4] {
    let d = w.len();
    let rows = x.len() / d;
    let (xs, ws, bs, gys) = (buffer::<T>(x), buffer::<T>(w), buffer::<T>(b), buffer::<T>(gy));
    let name = |base: &str| format!("{base}_{}", T::SUFFIX);
    let grid = Grid::rows(rows, d).expect("grid");
    let (di, ri, si) = (Arg::I32(d as i32), Arg::I32(rows as i32), Arg::I32(slice_rows as i32));
    let mut y = vec![T::default(); rows * d];
    let args = [
        Arg::input(&xs),
        Arg::input(&ws),
        Arg::input(&bs),
        Arg::output(&mut y),
        di,
        Arg::F64(EPS),
    ];
    launch(&name("ln_fwd"), &grid, &args);
    let mut dx = vec![T::default(); rows * d];
    let mut stats = vec![T::Acc::default(); 2 * rows];
    let args = [
        Arg::input(&xs),
        Arg::input(&ws),
        Arg::input(&gys),
        Arg::output(&mut dx),
        Arg::output(&mut stats),
        di,
        Arg::F64(EPS),
    ];
    launch(&name("ln_bwd"), &grid, &args);
    let n_slices = slices(rows, slice_rows);
    let mut partials = vec![T::Acc::default(); n_slices * 2 * d];
    let grid = Grid::column_partials(rows, d, slice_rows).expect("grid");
    let args = [
        Arg::input(&xs),
        Arg::input(&gys),
        Arg::input(&stats),
        Arg::output(&mut partials),
        ri,
        di,
        si,
    ];
    launch(&name("ln_dwb_partial"), &grid, &args);
    let mut dwb = vec![T::default(); 2 * d];
    let grid = Grid::column_finish(d).expect("grid");
    let args = [
        Arg::input(&partials),
        Arg::output(&mut dwb),
        Arg::I32(n_slices as i32),
        di,
    ];
    launch(&name("ln_dwb_finish"), &grid, &args);
    let dwb = widen(&dwb);
    [widen(&y), widen(&dx), dwb[..d].to_vec(), dwb[d..].to_vec()]
}

fn check<T: Element>(rows: usize, d: usize, slice_rows: usize) {
    // An offset mean: the centring matters.
    let x: Vec<f64> = noise(rows * d, 1, 3.0).iter().map(|v| v + 1.5).collect();
    let x = rounded::<T>(&x);
    let w = rounded::<T>(&noise(d, 2, 1.5));
    let b = rounded::<T>(&noise(d, 4, 1.0));
    let gy = rounded::<T>(&noise(rows * d, 3, 1.0));
    let [y, dx, dw, db] = kernels::<T>(&x, &w, &b, &gy, slice_rows);
    let f = |t: &[candle_core::Tensor]| super::layer_norm(&t[0], &t[1], &t[2], EPS);
    let (ry, rg) = reference(&f, &[(&x, &[rows, d]), (&w, &[d]), (&b, &[d])], &gy);
    let what = format!("layer norm {rows}x{d}");
    assert_close::<T>(&format!("{what} y"), &y, &ry);
    assert_close::<T>(&format!("{what} dx"), &dx, &rg[0]);
    assert_close::<T>(&format!("{what} dw"), &dw, &rg[1]);
    assert_close::<T>(&format!("{what} db"), &db, &rg[2]);
}

fn check_all<T: Element>() {
    // Odd widths, one narrower than a warp, one wide enough for 256 threads; several slices,
    // the last short; width 2 (the smallest with a variance).
    for (rows, d, slice_rows) in [(13, 300, 4), (5, 2_100, 2), (9, 7, 3), (3, 33, SLICE_ROWS), (4, 2, 3)] {
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
fn a_constant_row_normalises_to_the_bias() {
    // Variance 0: `xh = 0`, `y = b`, and `dx` has no `xh` term.
    let (w, b) = (vec![2.0, -1.0, 0.5], vec![0.25, 0.5, -0.75]);
    let [y, _, dw, db] = kernels::<f32>(&[3.0; 6], &w, &b, &[1.0; 6], SLICE_ROWS);
    assert_eq!(y, [b.clone(), b].concat());
    assert_eq!(dw, vec![0.0; 3]);
    assert_eq!(db, vec![2.0; 3]);
}
