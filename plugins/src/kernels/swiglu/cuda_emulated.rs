//! `swiglu.cu` on the CPU emulation: the forward and the backward (`dg` then `du`) in every
//! dtype against the fused CPU op in f64 on the same rounded inputs.

use half::{bf16, f16};

use crate::kernels::emulated::{assert_close, buffer, launch, noise, reference, rounded, widen, Arg, Element};
use crate::kernels::grid::Grid;

/// `(y, dg, du)` of the kernels on `grid`.
fn kernels<T: Element>(grid: &Grid, g: &[f64], u: &[f64], dy: &[f64]) -> [Vec<f64>; 3] {
    let n = g.len();
    let (gs, us, dys) = (buffer::<T>(g), buffer::<T>(u), buffer::<T>(dy));
    let mut y = vec![T::default(); n];
    let args = [
        Arg::input(&gs),
        Arg::input(&us),
        Arg::output(&mut y),
        Arg::U64(n as u64),
    ];
    launch(&format!("swiglu_fwd_{}", T::SUFFIX), grid, &args);
    let mut out = vec![T::default(); 2 * n];
    let args = [
        Arg::input(&gs),
        Arg::input(&us),
        Arg::input(&dys),
        Arg::output(&mut out),
        Arg::U64(n as u64),
    ];
    launch(&format!("swiglu_bwd_{}", T::SUFFIX), grid, &args);
    let out = widen(&out);
    [widen(&y), out[..n].to_vec(), out[n..].to_vec()]
}

fn check<T: Element>(n: usize, grid: &Grid) {
    // Gates up to +-12: the sigmoid saturates at both ends.
    let g = rounded::<T>(&noise(n, 1, 12.0));
    let u = rounded::<T>(&noise(n, 2, 2.0));
    let dy = rounded::<T>(&noise(n, 3, 1.0));
    let [y, dg, du] = kernels::<T>(grid, &g, &u, &dy);
    let f = |t: &[candle_core::Tensor]| super::swiglu(&t[0], &t[1]);
    let (ry, rg) = reference(&f, &[(&g, &[n]), (&u, &[n])], &dy);
    assert_close::<T>(&format!("swiglu[{n}] y"), &y, &ry);
    assert_close::<T>(&format!("swiglu[{n}] dg"), &dg, &rg[0]);
    assert_close::<T>(&format!("swiglu[{n}] du"), &du, &rg[1]);
}

fn check_all<T: Element>() {
    for n in [1, 255, 1_001] {
        check::<T>(n, &Grid::elements(n));
    }
    // Fewer threads than elements: each thread strides over several.
    let strided = Grid {
        blocks: (2, 1, 1),
        ..Grid::elements(1)
    };
    check::<T>(1_500, &strided);
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
