//! `topk_divergence.cu` on the CPU emulation: both tails, repeated and `-inf` entries, masked
//! rows, every storage dtype, against the CPU op in f64 on the same rounded logits.

use candle_core::{Device, Tensor};

use super::{per_token, TopkTail, COLS, EPS};
use crate::kernels::emulated::{
    buffer, launch, max_error, noise, row_weights, tolerance, value_and_grad, widen, Arg, Element,
};
use crate::kernels::grid::{int, Grid};

fn tail_code(tail: TopkTail) -> i32 {
    match tail {
        TopkTail::Bucket => 0,
        TopkTail::Renormalize => 1,
    }
}

/// The teacher's `k` entries per row: ids (one repeated, as the cache may hold) and log-probs
/// (one `-inf`, a union entry), in f64.
fn teacher(rows: usize, v: usize, k: usize) -> (Vec<u32>, Vec<f64>) {
    let ids: Vec<u32> = (0..rows * k)
        .map(|i| {
            if i % k == 1 {
                ((i - 1) * 13 % v) as u32
            } else {
                (i * 13 % v) as u32
            }
        })
        .collect();
    let lp: Vec<f64> = noise(rows * k, 31, 1.0)
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if i % k == k - 1 {
                f64::NEG_INFINITY
            } else {
                -2.0 - 2.0 * x.abs()
            }
        })
        .collect();
    (ids, lp)
}

/// `(D per row, weighted gradient)` of the emulated kernels.
#[allow(clippy::too_many_arguments)]
fn emulated<T: Element>(
    z: &[T],
    ids: &[u32],
    lp: &[f64],
    w: &[f64],
    v: usize,
    k: usize,
    tail: TopkTail,
    t: f64,
) -> (Vec<f64>, Vec<f64>) {
    let rows = w.len();
    let grid = Grid::rows(rows, v).expect("grid");
    let lpt: Vec<T::Acc> = buffer(lp);
    let mut out = vec![T::Acc::default(); rows * COLS];
    let (v_arg, k_arg) = (Arg::I32(int(v).expect("v")), Arg::I32(int(k).expect("k")));
    let (tail, inv_t) = (Arg::I32(tail_code(tail)), Arg::F64(1.0 / t));
    let fwd = [
        Arg::input(z),
        Arg::input(ids),
        Arg::input(&lpt),
        Arg::output(&mut out),
        v_arg,
        k_arg,
        tail,
        inv_t,
        Arg::F64(EPS),
    ];
    launch(&format!("topk_fwd_{}", T::SUFFIX), &grid, &fwd);
    let stats = widen(&out);
    // Per row: the k log-probs, the forward's columns, the row's weight.
    let packed: Vec<f64> = (0..rows)
        .flat_map(|r| {
            let row = lp[r * k..(r + 1) * k].iter().chain(&stats[r * COLS..(r + 1) * COLS]);
            row.copied().chain([w[r]]).collect::<Vec<_>>()
        })
        .collect();
    let packed: Vec<T::Acc> = buffer(&packed);
    let mut grad = vec![T::default(); rows * v];
    let bwd = [
        Arg::input(z),
        Arg::input(ids),
        Arg::input(&packed),
        Arg::output(&mut grad),
        v_arg,
        k_arg,
        tail,
        inv_t,
    ];
    launch(&format!("topk_bwd_{}", T::SUFFIX), &grid, &bwd);
    (stats.chunks(COLS).map(|r| r[0]).collect(), widen(&grad))
}

fn check<T: Element>(rows: usize, v: usize, k: usize) {
    let z: Vec<T> = buffer(&noise(rows * v, 32, 4.0));
    let (ids, lp) = teacher(rows, v, k);
    let w = row_weights(rows, 33);
    for (tail, t) in [(TopkTail::Bucket, 1.0), (TopkTail::Renormalize, 2.0)] {
        let (d, g) = emulated(&z, &ids, &lp, &w, v, k, tail, t);
        let ids_t = Tensor::from_vec(ids.clone(), (rows, k), &Device::Cpu).expect("ids");
        let lp_t = Tensor::from_vec(lp.clone(), (rows, k), &Device::Cpu).expect("lp");
        let (rd, rg) = value_and_grad(&|z| per_token(z, &ids_t, &lp_t, tail, t), &widen(&z), rows, &w);
        let (ed, eg) = (max_error(&d, &rd), max_error(&g, &rg));
        assert!(
            ed <= tolerance::<T>() && eg <= tolerance::<T>(),
            "{tail:?} {} [{rows}, {v}] k {k}: value error {ed:e}, gradient error {eg:e}",
            T::SUFFIX
        );
    }
}

#[test]
fn topk_kl_matches_the_cpu_in_every_dtype() {
    check::<f32>(4, 300, 8);
    check::<f64>(4, 300, 8);
    check::<half::f16>(4, 300, 8);
    check::<half::bf16>(4, 300, 8);
    check::<f32>(2, 9, 9);
    check::<f32>(2, 2_100, 200);
}
