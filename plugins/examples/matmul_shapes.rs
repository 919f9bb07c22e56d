//! candle's CPU matmul (the `gemm` crate) against the BLAS `CustomOp`
//! (`kernels::cpu::blas_matmul`, the `blas` feature) at the shapes of the reference KD step,
//! alternating the two so that both see the same machine load. Prints, per shape, the median
//! time of each and their ratio.
//!
//! `cargo run --release -p retort-plugins --features blas --example matmul_shapes -- [REPS]`
//! (default 200 calls per shape and side, in 5 alternating rounds).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use retort_plugins::kernels::cpu::blas_matmul::matmul;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let reps: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let dev = Device::Cpu;
    // (label, a dims, b dims, transpose b): the step's matmuls, forward and backward.
    let shapes: Vec<(&str, Vec<usize>, Vec<usize>, bool)> = vec![
        (
            "teacher qkv  [2048x128]x[128x384]",
            vec![2048, 128],
            vec![128, 384],
            false,
        ),
        (
            "teacher fc   [2048x128]x[128x512]",
            vec![2048, 128],
            vec![128, 512],
            false,
        ),
        (
            "teacher proj [2048x512]x[512x128]",
            vec![2048, 512],
            vec![512, 128],
            false,
        ),
        (
            "dW qkv       [128x2048]x[2048x384]",
            vec![128, 2048],
            vec![2048, 384],
            false,
        ),
        (
            "dX fc        [2048x512]x[512x128]^T",
            vec![2048, 512],
            vec![128, 512],
            true,
        ),
        (
            "head         [2048x128]x[65x128]^T",
            vec![2048, 128],
            vec![65, 128],
            true,
        ),
        ("student qkv  [2048x64]x[64x192]", vec![2048, 64], vec![64, 192], false),
        (
            "scores  64x  [128x32]x[128x32]^T",
            vec![64, 128, 32],
            vec![64, 128, 32],
            true,
        ),
        (
            "p @ v   64x  [128x128]x[128x32]",
            vec![64, 128, 128],
            vec![64, 128, 32],
            false,
        ),
    ];
    println!("threads {}", rayon::current_num_threads());
    for (label, ad, bd, tb) in shapes {
        let a = Tensor::randn(0f32, 1.0, ad.as_slice(), &dev)?;
        let b = Tensor::randn(0f32, 1.0, bd.as_slice(), &dev)?;
        let b = if tb { b.t()? } else { b };
        let want = a.matmul(&b)?;
        let got = matmul(&a, &b)?;
        let err = (want.clone() - got)?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let (mut tc, mut tb_) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..reps / 5 {
                std::hint::black_box(a.matmul(&b)?);
            }
            tc.push(t0.elapsed().as_secs_f64() / (reps / 5) as f64);
            let t0 = Instant::now();
            for _ in 0..reps / 5 {
                std::hint::black_box(matmul(&a, &b)?);
            }
            tb_.push(t0.elapsed().as_secs_f64() / (reps / 5) as f64);
        }
        let (c, bl) = (median(tc), median(tb_));
        println!(
            "{label:38} candle {:8.1} us  blas {:8.1} us  candle/blas {:5.2}x  max|diff| {err:.1e}",
            c * 1e6,
            bl * 1e6,
            c / bl
        );
    }
    Ok(())
}
