use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn rand(rng: &mut rand_chacha::ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).expect("t")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("v")
}

#[test]
fn matches_candle_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    // (a dims, b dims as stored, transpose a, transpose b)
    let cases: Vec<(Vec<usize>, Vec<usize>, bool, bool)> = vec![
        (vec![37, 19], vec![19, 23], false, false),
        (vec![70, 19], vec![23, 19], false, true),
        (vec![19, 70], vec![19, 23], true, false),
        (vec![19, 5], vec![23, 19], true, true),
        (vec![3, 2, 17, 8], vec![3, 2, 17, 8], false, true),
        (vec![6, 17, 17], vec![6, 17, 8], false, false),
        (vec![1, 8], vec![8, 1], false, false),
        (vec![4, 1, 9], vec![4, 9, 5], false, false),
    ];
    for dtype in [DType::F64, DType::F32] {
        for (ad, bd, ta, tb) in &cases {
            let a0 = rand(&mut rng, ad).to_dtype(dtype).expect("d");
            let b0 = rand(&mut rng, bd).to_dtype(dtype).expect("d");
            let run = |blas: bool| -> Vec<Vec<f64>> {
                let a = Var::from_tensor(&a0).expect("v");
                let b = Var::from_tensor(&b0).expect("v");
                let at = if *ta {
                    a.as_tensor().t().expect("t")
                } else {
                    a.as_tensor().clone()
                };
                let bt = if *tb {
                    b.as_tensor().t().expect("t")
                } else {
                    b.as_tensor().clone()
                };
                assert!(supports(&at, &bt));
                let c = if blas { matmul(&at, &bt) } else { at.matmul(&bt) }.expect("mm");
                let w = rand(&mut rand_chacha::ChaCha8Rng::seed_from_u64(5), c.dims())
                    .to_dtype(dtype)
                    .expect("d");
                let g = (&c * w)
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                vec![
                    flat(&c),
                    flat(g.get(a.as_tensor()).expect("da")),
                    flat(g.get(b.as_tensor()).expect("db")),
                ]
            };
            let (got, want) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (which, (g, w)) in ["C", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(g.len(), w.len());
                for (i, (x, y)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * (1.0 + y.abs()),
                        "{dtype:?} {ad:?}x{bd:?} ta={ta} tb={tb} {which}[{i}]: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn mismatched_batches_and_inner_dims_are_errors() {
    let a = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).expect("a");
    let b = Tensor::zeros((3, 4, 5), DType::F32, &Device::Cpu).expect("b");
    assert!(!supports(&a, &b));
    assert!(matmul(&a, &b).is_err());
    let b = Tensor::zeros((2, 5, 5), DType::F32, &Device::Cpu).expect("b");
    assert!(matmul(&a, &b).is_err());
}
