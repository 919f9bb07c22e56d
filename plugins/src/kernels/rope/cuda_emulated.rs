//! `rope.cu` on the CPU emulation (feature `cuda-emulate`): the kernel in each storage dtype,
//! both layouts, forward (`inverse = 0`) and backward (`inverse = 1`), against the op's CPU
//! implementation in f64 on the same rounded inputs (the gradient from candle's backward of
//! the fused op, whose own checks are in `tests.rs`).

use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};

use super::{grid, rope};
use crate::kernels::emulated::{buffer, launch, max_error, noise, tolerance, widen, Arg, Element};
use crate::kernels::grid::Grid;
use crate::kernels::test_util::values;

/// `[B, H, T, d]` cases: odd pair counts that fill no block, several blocks, a single pair,
/// and the head dims 2, 8, 64.
const SHAPES: &[[usize; 4]] = &[[1, 3, 5, 6], [2, 2, 7, 64], [1, 1, 1, 2], [3, 2, 4, 8]];

/// Positions of the first token (the tables' rows `offset..offset + T`).
const OFFSET: usize = 5;

/// Tables `[context, d/2]` of base 10000 as f64 values.
fn tables(context: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let angle = |k: usize| {
        let (p, i) = (k / half, k % half);
        p as f64 * 10_000f64.powf(-((2 * i) as f64) / d as f64)
    };
    (0..context * half).map(|k| (angle(k).cos(), angle(k).sin())).unzip()
}

/// The kernel `rope_<T>` over `x` `[rows, d]` with tables `[seq, d/2]` on `grid`.
fn kernel<T: Element>(x: &[T], cos: &[T], sin: &[T], d: usize, seq: usize, flags: (bool, bool), grid: &Grid) -> Vec<T> {
    let mut out = vec![T::from_f64(f64::NAN); x.len()];
    let args = [
        Arg::input(x),
        Arg::input(cos),
        Arg::input(sin),
        Arg::output(&mut out),
        Arg::U64((x.len() / 2) as u64),
        Arg::I32((d / 2) as i32),
        Arg::I32(seq as i32),
        Arg::I32(i32::from(flags.0)),
        Arg::I32(i32::from(flags.1)),
    ];
    launch(&format!("rope_{}", T::SUFFIX), grid, &args);
    out
}

/// `(y, dx)` of the CPU op in f64 on `x` with cotangent `dy` (all already rounded to `T`).
fn reference(
    dims: [usize; 4],
    x: &[f64],
    cos: &[f64],
    sin: &[f64],
    dy: &[f64],
    interleaved: bool,
) -> (Vec<f64>, Vec<f64>) {
    let dev = Device::Cpu;
    let t = |v: &[f64], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &dev).expect("tensor");
    let half = dims[3] / 2;
    let (c, s) = (t(cos, &[dims[2], half]), t(sin, &[dims[2], half]));
    let var = Var::from_tensor(&t(x, &dims)).expect("var");
    let y = rope(var.as_tensor(), &c, &s, interleaved).expect("cpu rope");
    assert_eq!(y.dtype(), DType::F64);
    let grads = (&y * t(dy, &dims))
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .expect("backward");
    (values(&y), values(grads.get(var.as_tensor()).expect("dx")))
}

/// Every case of [`SHAPES`] in storage `T`, both layouts, forward and backward.
fn check<T: Element>() {
    for (n, &dims) in SHAPES.iter().enumerate() {
        let [b, h, t, d] = dims;
        let len = b * h * t * d;
        let half = d / 2;
        let (cos_all, sin_all) = tables(OFFSET + t, d);
        let rows = OFFSET * half..(OFFSET + t) * half;
        let (cos, sin): (Vec<T>, Vec<T>) = (buffer(&cos_all[rows.clone()]), buffer(&sin_all[rows]));
        let x: Vec<T> = buffer(&noise(len, 2 * n as u64, 3.0));
        let dy: Vec<T> = buffer(&noise(len, 2 * n as u64 + 1, 1.0));
        let g = grid(len / 2);
        for interleaved in [false, true] {
            let (want_y, want_dx) = reference(dims, &widen(&x), &widen(&cos), &widen(&sin), &widen(&dy), interleaved);
            let y = widen(&kernel(&x, &cos, &sin, d, t, (interleaved, false), &g));
            let dx = widen(&kernel(&dy, &cos, &sin, d, t, (interleaved, true), &g));
            let (ey, edx) = (max_error(&y, &want_y), max_error(&dx, &want_dx));
            assert!(
                ey <= tolerance::<T>() && edx <= tolerance::<T>(),
                "rope_{} {dims:?} interleaved {interleaved}: value error {ey:e}, gradient error {edx:e}",
                T::SUFFIX
            );
        }
    }
}

#[test]
fn the_f32_kernel_matches_the_cpu_op() {
    check::<f32>();
}

#[test]
fn the_f64_kernel_matches_the_cpu_op() {
    check::<f64>();
}

#[test]
fn the_f16_kernel_matches_the_cpu_op() {
    check::<f16>();
}

#[test]
fn the_bf16_kernel_matches_the_cpu_op() {
    check::<bf16>();
}

/// A grid of fewer threads than pairs strides over all of them (what [`grid`] relies on past
/// its block limit), and a launch over no pairs writes nothing.
#[test]
fn a_small_grid_strides_over_every_pair_and_no_pairs_write_nothing() {
    let dims = [2, 3, 5, 8];
    let len: usize = dims.iter().product();
    let (cos, sin) = tables(5, 8);
    let x = noise(len, 11, 2.0);
    let small = Grid {
        blocks: (2, 1, 1),
        threads: (32, 1, 1),
        shared_bytes: 0,
    };
    assert!(len / 2 > 64);
    for interleaved in [false, true] {
        let (want, _) = reference(dims, &x, &cos, &sin, &x, interleaved);
        let y = kernel(&x, &cos, &sin, 8, 5, (interleaved, false), &small);
        assert!(max_error(&y, &want) <= 1e-12, "interleaved {interleaved}");
    }
    let empty: Vec<f64> = Vec::new();
    assert!(kernel(&empty, &cos, &sin, 8, 5, (false, false), &grid(0)).is_empty());
    assert_eq!(grid(0).blocks.0, 1);
    assert_eq!(grid(100_000_000).blocks.0 as usize, super::MAX_BLOCKS);
}
