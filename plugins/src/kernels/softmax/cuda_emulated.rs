//! `softmax.cu` on the CPU emulation: the plain and the causal forward and the backward in
//! every dtype against the fused CPU op in f64 on the same rounded inputs.

use candle_core::Tensor;
use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::Grid;

/// `(y, dx)` of the kernels on `rows x v` scores; the backward from the kernel's `y`.
fn kernels<T: Element>(x: &[f64], gy: &[f64], v: usize, causal: bool) -> [Vec<f64>; 2] {
    let rows = x.len() / v;
    let (xs, gys) = (buffer::<T>(x), buffer::<T>(gy));
    let grid = Grid::rows(rows, v).expect("grid");
    let mut y = vec![T::default(); rows * v];
    let args = [
        Arg::input(&xs),
        Arg::output(&mut y),
        Arg::I32(v as i32),
        Arg::I32(i32::from(causal)),
    ];
    launch(&format!("softmax_fwd_{}", T::SUFFIX), &grid, &args);
    let mut dx = vec![T::default(); rows * v];
    let args = [
        Arg::input(&y),
        Arg::input(&gys),
        Arg::output(&mut dx),
        Arg::I32(v as i32),
    ];
    launch(&format!("softmax_bwd_{}", T::SUFFIX), &grid, &args);
    [widen(&y), widen(&dx)]
}

/// `dims` (`[.., v]`; `[.., T, T]` with `causal`).
fn check<T: Element>(dims: &[usize], causal: bool) {
    let n: usize = dims.iter().product();
    let v = dims[dims.len() - 1];
    // Scores up to +-20: rows dominated by one entry, and entries that underflow.
    let x = rounded::<T>(&noise(n, 1, 20.0));
    let gy = rounded::<T>(&noise(n, 2, 1.0));
    let [y, dx] = kernels::<T>(&x, &gy, v, causal);
    let f = |t: &[Tensor]| {
        if causal {
            let mask = super::causal_mask(v, t[0].dtype(), t[0].device())?;
            super::causal_softmax(&t[0], &mask)
        } else {
            super::softmax_last(&t[0])
        }
    };
    let (ry, rg) = reference(&f, &[(&x, dims)], &gy);
    let what = format!("softmax {dims:?} causal={causal}");
    assert_close::<T>(&format!("{what} y"), &y, &ry);
    assert_close::<T>(&format!("{what} dx"), &dx, &rg[0]);
    if causal {
        // Past the diagonal: exactly 0, and no gradient.
        for (i, (p, g)) in y.iter().zip(&dx).enumerate() {
            let (r, c) = (i / v % v, i % v);
            if c > r {
                assert!(*p == 0.0 && *g == 0.0, "{what}: [{r}, {c}] = {p}, grad {g}");
            }
        }
    }
}

fn check_all<T: Element>() {
    for dims in [&[13, 300][..], &[3, 2_100], &[1, 1], &[9, 7]] {
        check::<T>(dims, false);
    }
    for dims in [&[2, 3, 37, 37][..], &[1, 1], &[2, 5, 5]] {
        check::<T>(dims, true);
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
fn minus_infinity_scores_get_no_probability() {
    let x = [0.0, f64::NEG_INFINITY, 0.0, f64::NEG_INFINITY];
    let [y, _] = kernels::<f32>(&x, &[0.0; 4], 4, false);
    assert_eq!(y, [0.5, 0.0, 0.5, 0.0]);
}
