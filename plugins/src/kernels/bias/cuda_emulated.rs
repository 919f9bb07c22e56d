//! `bias.cu` on the CPU emulation: the add and the row sums in every dtype against the fused
//! CPU op in f64 on the same rounded inputs; and the half-precision stores of the emulator
//! against the `half` crate, bit for bit.

use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::{slices, Grid, SLICE_ROWS};

/// `x + b` by the kernel, `x` rows of `b.len()`.
fn add<T: Element>(xs: &[T], bs: &[T]) -> Vec<T> {
    let n = bs.len();
    let rows = xs.len() / n;
    let mut y = vec![T::default(); rows * n];
    let args = [Arg::input(xs), Arg::input(bs), Arg::output(&mut y), Arg::I32(n as i32)];
    launch(
        &format!("bias_fwd_{}", T::SUFFIX),
        &Grid::rows(rows, n).expect("grid"),
        &args,
    );
    y
}

/// The row sums of `gy` (`rows x n`) by the kernels, `slice_rows` rows per slice.
fn sum_rows<T: Element>(gy: &[T], n: usize, slice_rows: usize) -> Vec<T> {
    let rows = gy.len() / n;
    let n_slices = slices(rows, slice_rows);
    let mut partials = vec![T::Acc::default(); n_slices * n];
    let grid = Grid::column_partials(rows, n, slice_rows).expect("grid");
    let args = [
        Arg::input(gy),
        Arg::output(&mut partials),
        Arg::I32(rows as i32),
        Arg::I32(n as i32),
        Arg::I32(slice_rows as i32),
    ];
    launch(&format!("sum_rows_partial_{}", T::SUFFIX), &grid, &args);
    let mut db = vec![T::default(); n];
    let args = [
        Arg::input(&partials),
        Arg::output(&mut db),
        Arg::I32(n_slices as i32),
        Arg::I32(n as i32),
    ];
    launch(
        &format!("sum_rows_finish_{}", T::SUFFIX),
        &Grid::column_finish(n).expect("grid"),
        &args,
    );
    db
}

fn check<T: Element>(rows: usize, n: usize, slice_rows: usize) {
    let x = rounded::<T>(&noise(rows * n, 1, 3.0));
    let b = rounded::<T>(&noise(n, 2, 3.0));
    let gy = rounded::<T>(&noise(rows * n, 3, 1.0));
    let y = widen(&add(&buffer::<T>(&x), &buffer::<T>(&b)));
    let db = widen(&sum_rows(&buffer::<T>(&gy), n, slice_rows));
    let f = |t: &[candle_core::Tensor]| super::add_bias(&t[0], &t[1]);
    let (ry, rg) = reference(&f, &[(&x, &[rows, n]), (&b, &[n])], &gy);
    let what = format!("bias {rows}x{n}");
    assert_close::<T>(&format!("{what} y"), &y, &ry);
    assert_close::<T>(&format!("{what} db"), &db, &rg[1]);
}

fn check_all<T: Element>() {
    for (rows, n, slice_rows) in [
        (37, 300, 8),
        (3, 2_100, 2),
        (1, 1, SLICE_ROWS),
        (70, 5, SLICE_ROWS),
        (9, 257, 9),
    ] {
        check::<T>(rows, n, slice_rows);
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
fn no_rows_sum_to_zero() {
    assert_eq!(widen(&sum_rows::<f32>(&[], 4, SLICE_ROWS)), vec![0.0; 4]);
}

/// Pairs `(x, b)` whose f32 sums are not representable in half precision: halfway cases
/// (ties to even both ways), sums that overflow, reach the subnormals, cancel, and random
/// ones, for a type whose unit in the last place at 1 is `ulp`.
fn awkward(ulp: f32) -> Vec<(f32, f32)> {
    let mut pairs = vec![
        (1.0, ulp / 2.0),         // a tie, rounds down to the even 1
        (1.0 + ulp, ulp / 2.0),   // a tie, rounds up to the even 1 + 2 ulp
        (1.0, ulp * 0.75),        // above the tie: up
        (1.0, ulp * 0.25),        // below the tie: down
        (-1.0 - ulp, -ulp / 2.0), // negative tie, up in magnitude
        (3.0e-5, -2.9e-5),        // a subnormal in f16
        (6.0e4, 5.6e3),           // overflows f16's range
        (1.0e-38, 1.0e-39),       // subnormal in bf16
        (f32::INFINITY, -1.0),    // stays infinite
        (1.0, -1.0),              // exact zero
    ];
    pairs.extend(
        noise(400, 11, 1.0)
            .chunks(2)
            .map(|p| ((p[0] * 300.0) as f32, (p[1] * 7.0) as f32)),
    );
    pairs
}

/// The emulated kernel's half stores round to nearest even: the f16 and bf16 adds equal the
/// `half` crate's rounding of the f32 sum of the same (half) operands, bit for bit.
#[test]
fn half_stores_round_to_nearest_even_as_the_half_crate() {
    let pairs = awkward(f32::EPSILON * 8192.0); // f16: 2^-10
    let xs: Vec<f16> = pairs.iter().map(|p| f16::from_f32(p.0)).collect();
    let bs: Vec<f16> = pairs.iter().map(|p| f16::from_f32(p.1)).collect();
    let got = add(&xs, &bs);
    for ((x, b), y) in xs.iter().zip(&bs).zip(got) {
        let want = f16::from_f32(x.to_f32() + b.to_f32());
        assert_eq!(y.to_bits(), want.to_bits(), "f16: {x} + {b} gave {y}, want {want}");
    }
    let pairs = awkward(f32::EPSILON * 65536.0); // bf16: 2^-7
    let xs: Vec<bf16> = pairs.iter().map(|p| bf16::from_f32(p.0)).collect();
    let bs: Vec<bf16> = pairs.iter().map(|p| bf16::from_f32(p.1)).collect();
    let got = add(&xs, &bs);
    for ((x, b), y) in xs.iter().zip(&bs).zip(got) {
        let want = bf16::from_f32(x.to_f32() + b.to_f32());
        assert_eq!(y.to_bits(), want.to_bits(), "bf16: {x} + {b} gave {y}, want {want}");
    }
}
