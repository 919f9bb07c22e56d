//! `divergence.cu` on the CPU emulation: every kind's forward and backward kernels, in every
//! storage dtype, against the CPU op in f64 on the same rounded logits.

use candle_core::{Device, Tensor};

use super::{per_token_and_grad, Divergence, COLS};
use crate::kernels::emulated::{buffer, launch, max_error, noise, row_weights, tolerance, widen, Arg, Element};
use crate::kernels::grid::{int, Grid};
use crate::kernels::test_util::values;

/// `(D per row, weighted gradient)` of the emulated kernels on logits `[rows, v]`.
fn emulated<T: Element>(zs: &[T], zt: &[T], w: &[f64], v: usize, t: f64, kind: Divergence) -> (Vec<f64>, Vec<f64>) {
    let rows = w.len();
    let grid = Grid::rows(rows, v).expect("grid");
    let (code, param) = kind.kernel_code();
    let mut out = vec![T::Acc::default(); rows * COLS];
    let fwd = [
        Arg::input(zs),
        Arg::input(zt),
        Arg::output(&mut out),
        Arg::I32(int(v).expect("v")),
        Arg::I32(code),
        Arg::F64(1.0 / t),
        Arg::F64(param),
    ];
    launch(&format!("divergence_fwd_{}", T::SUFFIX), &grid, &fwd);
    let stats: Vec<f64> = widen(&out);
    // The backward's statistics: the forward's columns, then the row's weight.
    let packed: Vec<f64> = stats
        .chunks(COLS)
        .zip(w)
        .flat_map(|(row, g)| row.iter().copied().chain([*g]))
        .collect();
    let packed: Vec<T::Acc> = buffer(&packed);
    let mut grad = vec![T::default(); rows * v];
    let bwd = [
        Arg::input(zs),
        Arg::input(zt),
        Arg::input(&packed),
        Arg::output(&mut grad),
        Arg::I32(int(v).expect("v")),
        Arg::I32(code),
        Arg::F64(1.0 / t),
        Arg::F64(param),
    ];
    launch(&format!("divergence_bwd_{}", T::SUFFIX), &grid, &bwd);
    (stats.chunks(COLS).map(|r| r[0]).collect(), widen(&grad))
}

/// The CPU op in f64 on the same (rounded) logits.
fn reference(zs: &[f64], zt: &[f64], w: &[f64], v: usize, t: f64, kind: Divergence) -> (Vec<f64>, Vec<f64>) {
    let rows = w.len();
    let tensor = |x: &[f64], shape: (usize, usize)| Tensor::from_vec(x.to_vec(), shape, &Device::Cpu).expect("tensor");
    let w = Tensor::from_vec(w.to_vec(), rows, &Device::Cpu).expect("w");
    let (d, g) = per_token_and_grad(&tensor(zs, (rows, v)), &tensor(zt, (rows, v)), t, kind, &w).expect("reference");
    (values(&d), values(&g))
}

fn check<T: Element>(rows: usize, v: usize) {
    let zs: Vec<T> = buffer(&noise(rows * v, 11, 4.0));
    let zt: Vec<T> = buffer(&noise(rows * v, 12, 4.0));
    let w = row_weights(rows, 13);
    let kinds = [
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd(0.3),
        Divergence::SkewForward(0.2),
        Divergence::SkewReverse(0.4),
        Divergence::Tvd,
    ];
    for kind in kinds {
        for t in [1.0, 2.0] {
            let (d, g) = emulated(&zs, &zt, &w, v, t, kind);
            let (rd, rg) = reference(&widen(&zs), &widen(&zt), &w, v, t, kind);
            let (ed, eg) = (max_error(&d, &rd), max_error(&g, &rg));
            let tol = tolerance::<T>();
            assert!(
                ed <= tol && eg <= tol,
                "{kind:?} T={t} {} [{rows}, {v}]: value error {ed:e}, gradient error {eg:e}",
                T::SUFFIX
            );
        }
    }
}

#[test]
fn every_kind_matches_the_cpu_in_every_dtype() {
    check::<f32>(4, 301);
    check::<f64>(4, 301);
    check::<half::f16>(4, 301);
    check::<half::bf16>(4, 301);
}

#[test]
fn wide_rows_with_more_threads_match_the_cpu() {
    // 2,100 columns: 256 threads per block, a partial last sweep.
    check::<f32>(2, 2_100);
}

#[test]
fn one_column_rows_match_the_cpu() {
    check::<f32>(3, 1);
}
