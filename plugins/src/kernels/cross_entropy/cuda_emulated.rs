//! `cross_entropy.cu` on the CPU emulation: forward and backward, label smoothing, masked rows,
//! in every storage dtype, against the CPU op in f64 on the same rounded logits.

use candle_core::Tensor;

use super::{per_token, COLS};
use crate::kernels::emulated::{
    buffer, launch, max_error, noise, row_weights, tolerance, value_and_grad, widen, Arg, Element,
};
use crate::kernels::grid::{int, Grid};

/// `(L per row, weighted gradient)` of the emulated kernels.
fn emulated<T: Element>(z: &[T], y: &[u32], w: &[f64], v: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let rows = y.len();
    let grid = Grid::rows(rows, v).expect("grid");
    let mut out = vec![T::Acc::default(); rows * COLS];
    let v_arg = Arg::I32(int(v).expect("v"));
    let fwd = [
        Arg::input(z),
        Arg::input(y),
        Arg::output(&mut out),
        v_arg,
        Arg::F64(eps),
    ];
    launch(&format!("ce_fwd_{}", T::SUFFIX), &grid, &fwd);
    let stats = widen(&out);
    let packed: Vec<f64> = stats
        .chunks(COLS)
        .zip(w)
        .flat_map(|(r, g)| r.iter().copied().chain([*g]))
        .collect();
    let packed: Vec<T::Acc> = buffer(&packed);
    let mut grad = vec![T::default(); rows * v];
    let bwd = [
        Arg::input(z),
        Arg::input(y),
        Arg::input(&packed),
        Arg::output(&mut grad),
        v_arg,
        Arg::F64(eps),
    ];
    launch(&format!("ce_bwd_{}", T::SUFFIX), &grid, &bwd);
    (stats.chunks(COLS).map(|r| r[0]).collect(), widen(&grad))
}

fn check<T: Element>(rows: usize, v: usize) {
    let z: Vec<T> = buffer(&noise(rows * v, 21, 4.0));
    let y: Vec<u32> = (0..rows).map(|r| ((r * 7919 + 3) % v) as u32).collect();
    let w = row_weights(rows, 22);
    for eps in [0.0, 0.1] {
        let (l, g) = emulated(&z, &y, &w, v, eps);
        let targets = Tensor::new(y.as_slice(), &candle_core::Device::Cpu).expect("targets");
        let (rl, rg) = value_and_grad(&|z| per_token(z, &targets, eps), &widen(&z), rows, &w);
        let (el, eg) = (max_error(&l, &rl), max_error(&g, &rg));
        assert!(
            el <= tolerance::<T>() && eg <= tolerance::<T>(),
            "eps {eps} {} [{rows}, {v}]: value error {el:e}, gradient error {eg:e}",
            T::SUFFIX
        );
    }
}

#[test]
fn cross_entropy_matches_the_cpu_in_every_dtype() {
    check::<f32>(5, 301);
    check::<f64>(5, 301);
    check::<half::f16>(5, 301);
    check::<half::bf16>(5, 301);
    check::<f32>(2, 2_100);
    check::<f32>(3, 1);
}
