//! `adamw.cu` on the CPU emulation: the in-place group update (a table of addresses, one grid
//! row per tensor, tensors of unequal lengths) against the composite update, and the sums of
//! squares in every dtype against f64 sums.

use candle_core::{Device, Tensor};

use super::{composite, AdamWStep};
use crate::kernels::emulated::{buffer, launch, max_error, noise, widen, Arg, Element};
use crate::kernels::grid::Grid;
use crate::kernels::test_util::values;

/// The step the tests take: clipping and decay on, bias corrections of step 3.
fn step() -> AdamWStep {
    AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        bias_correction1: 1.0 - 0.9f64.powi(3),
        bias_correction2: 1.0 - 0.95f64.powi(3),
        eps: 1e-8,
        lr: 1e-2,
        weight_decay: 0.1,
        grad_scale: 0.5,
    }
}

/// The device address (here: the host address) of a buffer, as the kernels' tables hold it.
fn address<T>(x: &[T]) -> u64 {
    x.as_ptr() as u64
}

fn update_group<T: Element>(lengths: &[usize]) {
    let s = step();
    let make = |seed: u64, scale: f64, positive: bool| -> Vec<Vec<T>> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let x = noise(n, seed + i as u64, scale);
                buffer(
                    &x.iter()
                        .map(|v| if positive { v.abs() } else { *v })
                        .collect::<Vec<_>>(),
                )
            })
            .collect()
    };
    let (mut w, g, mut m, mut v) = (
        make(1, 1.0, false),
        make(2, 0.1, false),
        make(3, 0.01, false),
        make(4, 1e-4, true),
    );
    let expected: Vec<[Vec<f64>; 3]> = (0..lengths.len())
        .map(|i| {
            let t = |x: &[T]| Tensor::from_vec(widen(x), x.len(), &Device::Cpu).expect("tensor");
            let (nw, nm, nv) = composite::update(&t(&w[i]), &t(&g[i]), &t(&m[i]), &t(&v[i]), s).expect("composite");
            [values(&nw), values(&nm), values(&nv)]
        })
        .collect();
    let mut table: Vec<u64> = Vec::new();
    table.extend(w.iter().map(|x| address(x)));
    table.extend(g.iter().map(|x| address(x)));
    table.extend(m.iter().map(|x| address(x)));
    table.extend(v.iter().map(|x| address(x)));
    table.extend(lengths.iter().map(|&n| n as u64));
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let grid = Grid::group(lengths.len(), longest, 4);
    let scalars = [
        s.beta1,
        s.beta2,
        s.bias_correction1,
        s.bias_correction2,
        s.eps,
        s.lr,
        1.0 - s.lr * s.weight_decay,
        s.grad_scale,
    ];
    let mut args = vec![Arg::input(&table), Arg::U32(lengths.len() as u32)];
    args.extend(scalars.map(Arg::F64));
    launch(&format!("adamw_{}", T::SUFFIX), &grid, &args);
    let tol = if T::SUFFIX == "f64" { 1e-12 } else { 1e-5 };
    for (i, want) in expected.iter().enumerate() {
        for (what, got, want) in [
            ("w", &mut w[i], &want[0]),
            ("m", &mut m[i], &want[1]),
            ("v", &mut v[i], &want[2]),
        ] {
            let e = max_error(&widen(got), want);
            assert!(
                e <= tol,
                "{} tensor {i} ({} elements) {what}: error {e:e}",
                T::SUFFIX,
                lengths[i]
            );
        }
    }
}

#[test]
fn a_group_of_unequal_tensors_is_updated_in_place_like_the_composite() {
    // More elements than the 4 x 256 threads of a grid row: the grid-stride loop.
    update_group::<f32>(&[1, 300, 2_500]);
    update_group::<f64>(&[1, 300, 2_500]);
}

fn sums_of_squares<T: Element>(lengths: &[usize]) {
    let xs: Vec<Vec<T>> = lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| buffer(&noise(n, 40 + i as u64, 3.0)))
        .collect();
    let mut table: Vec<u64> = xs.iter().map(|x| address(x)).collect();
    table.extend(lengths.iter().map(|&n| n as u64));
    let grid = Grid::group(xs.len(), lengths.iter().copied().max().unwrap_or(0), 3);
    let blocks = grid.blocks.0 as usize;
    let mut partial = vec![0f64; blocks * xs.len()];
    let args = [Arg::input(&table), Arg::U32(xs.len() as u32), Arg::output(&mut partial)];
    launch(&format!("sum_squares_{}", T::SUFFIX), &grid, &args);
    for (i, x) in xs.iter().enumerate() {
        let got: f64 = partial[i * blocks..(i + 1) * blocks].iter().sum();
        let want: f64 = widen(x).iter().map(|v| v * v).sum();
        assert!(
            (got - want).abs() <= 1e-12 * want.max(1e-300),
            "{} tensor {i}: {got} vs {want}",
            T::SUFFIX
        );
    }
}

#[test]
fn sums_of_squares_match_f64_sums_in_every_dtype() {
    for lengths in [&[5usize, 1_000, 2_000][..], &[0, 3]] {
        sums_of_squares::<f32>(lengths);
        sums_of_squares::<f64>(lengths);
        sums_of_squares::<half::f16>(lengths);
        sums_of_squares::<half::bf16>(lengths);
    }
}
