use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

/// Values, `dx` and `dw` against the composite, f64 (1e-10) and f32 (1e-5), on rows whose
/// scales differ by orders of magnitude.
#[test]
fn matches_composite_values_and_gradients() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let (rows, d) = (130, 40);
    let xs: Vec<f64> = (0..rows * d)
        .map(|i| rng.random_range(-2.0..3.0) * 10f64.powi((i / d % 5) as i32 - 2))
        .collect();
    let x0 = Tensor::from_vec(xs, (2, 65, d), &Device::Cpu).expect("x");
    let w0 = Tensor::from_vec(
        (0..d).map(|_| rng.random_range(0.5..1.5)).collect::<Vec<f64>>(),
        d,
        &Device::Cpu,
    )
    .expect("w");
    let c0 = Tensor::from_vec(
        (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect::<Vec<f64>>(),
        (2, 65, d),
        &Device::Cpu,
    )
    .expect("c");
    for dtype in [DType::F64, DType::F32] {
        let run = |is_fused: bool| -> Vec<Vec<f64>> {
            let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("x");
            let w = Var::from_tensor(&w0.to_dtype(dtype).expect("d")).expect("w");
            let y = if is_fused {
                fused(x.as_tensor(), w.as_tensor(), 1e-6).expect("fused")
            } else {
                composite::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).expect("composite")
            };
            let g = (&y * c0.to_dtype(dtype).expect("d"))
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            vec![
                values(&y),
                values(g.get(x.as_tensor()).expect("dx")),
                values(g.get(w.as_tensor()).expect("dw")),
            ]
        };
        let (a, c) = (run(true), run(false));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for (k, (p, q)) in a.iter().zip(&c).enumerate() {
            // Relative to the largest magnitude of the same row (`y`, `dx`: rows differ in
            // scale by 1e4) or of the whole tensor (`dw`).
            let width = if k < 2 { d } else { q.len() };
            for (r, (pr, qr)) in p.chunks(width).zip(q.chunks(width)).enumerate() {
                let scale = qr.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
                for (i, (u, v)) in pr.iter().zip(qr).enumerate() {
                    assert!(
                        (u - v).abs() <= tol * scale,
                        "{dtype:?} out {k} row {r} [{i}]: {u} vs {v}"
                    );
                }
            }
        }
    }
}

#[test]
fn weight_shape_is_checked() {
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).expect("x");
    let w = Tensor::zeros(3, DType::F32, &Device::Cpu).expect("w");
    assert!(rms_norm(&x, &w, 1e-6).unwrap_err().to_string().contains("must be [4]"));
}

#[test]
fn rms_norm_matches_reference_and_has_gradients() {
    // Reference: x = [1, 2, 3, 6]: mean(x^2) = 50 / 4 = 12.5, y = x / sqrt(12.5 + 1e-6) * w.
    let x = Tensor::new(&[[1f64, 2., 3., 6.]], &Device::Cpu).expect("t");
    let w = Var::new(&[1f64, 2., 1., 0.5], &Device::Cpu).expect("w");
    let y = rms_norm(&x, w.as_tensor(), 1e-6).expect("rms");
    let got = y.to_vec2::<f64>().expect("v");
    for (i, (xi, wi)) in [1f64, 2., 3., 6.].iter().zip([1f64, 2., 1., 0.5]).enumerate() {
        let want = xi / (12.5f64 + 1e-6).sqrt() * wi;
        assert!((got[0][i] - want).abs() < 1e-12);
    }
    let grads = y.sum_all().expect("sum").backward().expect("bwd");
    assert!(grads.get(w.as_tensor()).is_some());
}

#[test]
fn dispatch_follows_the_support_table() {
    let x = Tensor::new(&[[1f32, 2., 3., 6.]], &Device::Cpu).expect("x");
    let w = Tensor::ones(4, DType::F32, &Device::Cpu).expect("w");
    assert!(supports(&x, &w));
    assert!(!supports(&x, &w.to_dtype(DType::F64).expect("f64")));
    let h = |t: &Tensor| t.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&h(&x), &h(&w)));
    assert_eq!(rms_norm(&h(&x), &h(&w), 1e-6).expect("composite").dtype(), DType::BF16);
}
