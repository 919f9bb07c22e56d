//! `gelu.cu` on the CPU emulation: the forward and the backward in every dtype against the
//! fused CPU op (tanh approximation) in f64 on the same rounded inputs.

use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::Grid;

/// `(y, dx)` of the kernels on `grid`.
fn kernels<T: Element>(grid: &Grid, x: &[f64], gy: &[f64]) -> [Vec<f64>; 2] {
    let n = x.len();
    let (xs, gys) = (buffer::<T>(x), buffer::<T>(gy));
    let mut y = vec![T::default(); n];
    let args = [Arg::input(&xs), Arg::output(&mut y), Arg::U64(n as u64)];
    launch(&format!("gelu_fwd_{}", T::SUFFIX), grid, &args);
    let mut dx = vec![T::default(); n];
    let args = [
        Arg::input(&xs),
        Arg::input(&gys),
        Arg::output(&mut dx),
        Arg::U64(n as u64),
    ];
    launch(&format!("gelu_bwd_{}", T::SUFFIX), grid, &args);
    [widen(&y), widen(&dx)]
}

fn check<T: Element>(n: usize, grid: &Grid) {
    // Inputs up to +-8: both tails of the tanh, and the curved middle.
    let x = rounded::<T>(&noise(n, 1, 8.0));
    let gy = rounded::<T>(&noise(n, 2, 1.0));
    let [y, dx] = kernels::<T>(grid, &x, &gy);
    let f = |t: &[candle_core::Tensor]| super::gelu(&t[0]);
    let (ry, rg) = reference(&f, &[(&x, &[n])], &gy);
    assert_close::<T>(&format!("gelu[{n}] y"), &y, &ry);
    assert_close::<T>(&format!("gelu[{n}] dx"), &dx, &rg[0]);
}

fn check_all<T: Element>() {
    for n in [1, 255, 1_001] {
        check::<T>(n, &Grid::elements(n));
    }
    // Fewer threads than elements: each thread strides over several.
    let strided = Grid {
        blocks: (3, 1, 1),
        ..Grid::elements(1)
    };
    check::<T>(2_000, &strided);
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

/// The tanh approximation, not the erf GELU: at x = 1 they differ by ~1.6e-4 (above f32's
/// tolerance), and the kernel gives the tanh one.
#[test]
fn the_kernel_is_the_tanh_approximation() {
    let [y, _] = kernels::<f64>(&Grid::elements(1), &[1.0], &[1.0]);
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let want = 0.5 * (1.0 + (c * (1.0 + 0.044_715)).tanh());
    assert!((y[0] - want).abs() < 1e-14, "{} vs {want}", y[0]);
}
