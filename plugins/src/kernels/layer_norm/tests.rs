use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

#[test]
fn matches_composite_values_and_all_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (rows, d) = (150, 48);
    let mut draw = |n: usize, lo: f64, hi: f64| -> Vec<f64> { (0..n).map(|_| rng.random_range(lo..hi)).collect() };
    let x0 = Tensor::from_vec(draw(rows * d, -3.0, 5.0), (3, 50, d), &Device::Cpu).expect("x");
    let w0 = Tensor::from_vec(draw(d, 0.5, 1.5), d, &Device::Cpu).expect("w");
    let b0 = Tensor::from_vec(draw(d, -0.5, 0.5), d, &Device::Cpu).expect("b");
    let c0 = Tensor::from_vec(draw(rows * d, -1.0, 1.0), (3, 50, d), &Device::Cpu).expect("c");
    for dtype in [DType::F64, DType::F32] {
        let run = |is_fused: bool| -> Vec<Vec<f64>> {
            let v = |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).expect("d")).expect("v");
            let (x, w, b) = (v(&x0), v(&w0), v(&b0));
            let y = if is_fused {
                fused(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).expect("fused")
            } else {
                composite::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).expect("composite")
            };
            let grads = (&y * c0.to_dtype(dtype).expect("d"))
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            vec![
                values(&y),
                values(grads.get(x.as_tensor()).expect("dx")),
                values(grads.get(w.as_tensor()).expect("dw")),
                values(grads.get(b.as_tensor()).expect("db")),
            ]
        };
        let (fu, co) = (run(true), run(false));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for (name, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(fu.iter().zip(&co)) {
            let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= tol * scale, "{dtype:?} {name}[{i}]: {p} vs {q}");
            }
        }
    }
}

#[test]
fn layer_norm_matches_reference_and_has_gradients() {
    // Reference: x = [1, 2, 3, 6]: mean 3, var 3.5, y = (x - 3) / sqrt(3.5 + 1e-5).
    let x = Tensor::new(&[[1f64, 2., 3., 6.]], &Device::Cpu).expect("t");
    let w = Var::new(&[1f64, 1., 1., 1.], &Device::Cpu).expect("w");
    let b = Var::new(&[0f64, 0., 0., 0.], &Device::Cpu).expect("b");
    let y = layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).expect("ln");
    let got = y.to_vec2::<f64>().expect("v");
    for (i, xi) in [1f64, 2., 3., 6.].iter().enumerate() {
        let want = (xi - 3.0) / (3.5f64 + 1e-5).sqrt();
        assert!((got[0][i] - want).abs() < 1e-12);
    }
    // Unlike candle_nn::LayerNorm's fast path, gradients reach weight and bias.
    let loss = (y * Tensor::new(&[[1f64, -2., 3., 0.5]], &Device::Cpu).expect("c")).expect("mul");
    let grads = loss.sum_all().expect("sum").backward().expect("bwd");
    assert!(grads.get(w.as_tensor()).is_some());
    assert!(grads.get(b.as_tensor()).is_some());
}

#[test]
fn dispatch_follows_the_support_table() {
    let x = Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu).expect("x");
    let (w, b) = (
        Tensor::ones(4, DType::F32, &Device::Cpu).expect("w"),
        Tensor::zeros(4, DType::F32, &Device::Cpu).expect("b"),
    );
    assert!(supports(&x, &w, &b));
    assert!(!supports(&x, &w, &b.to_dtype(DType::F64).expect("f64")));
    let h = |t: &Tensor| t.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&h(&x), &h(&w), &h(&b)));
    assert_eq!(
        layer_norm(&h(&x), &h(&w), &h(&b), 1e-5).expect("composite").dtype(),
        DType::F16
    );
}
