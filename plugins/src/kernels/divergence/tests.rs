use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn logits(rows: usize, v: usize, seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f64> = (0..rows * v).map(|_| rng.random_range(-4.0..4.0)).collect();
    Tensor::from_vec(x, (2, rows / 2, v), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("logits")
}

/// Weighted sum of per-token values (non-uniform token weights), with the gradient.
fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(z).expect("var");
    let per = f(var.as_tensor());
    let (b, s) = per.dims2().expect("2d");
    let w: Vec<f64> = (0..b * s).map(|i| 0.5 + (i % 3) as f64).collect();
    let w = Tensor::from_vec(w, (b, s), &Device::Cpu)
        .and_then(|w| w.to_dtype(per.dtype()))
        .expect("w");
    let loss = (per.clone() * w).and_then(|x| x.sum_all()).expect("loss");
    let g = loss.backward().expect("bwd");
    let grad = g.get(var.as_tensor()).expect("grad");
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec")
    };
    (flat(&per), flat(grad))
}

fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * scale,
            "{what}[{i}]: fused {x} vs composite {y} (scale {scale})"
        );
    }
}

#[test]
fn matches_composite_values_and_gradients() {
    for kind in [
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd(0.3),
        Divergence::Jsd(0.9),
    ] {
        for (t, v) in [(1.0, 37), (2.0, 1000), (0.7, 5)] {
            let zs = logits(6, v, 1, DType::F64);
            let zt = logits(6, v, 2, DType::F64);
            let (fv, fg) = value_and_grad(|z| fused(z, &zt, t, kind).expect("fused"), &zs);
            let (cv, cg) = value_and_grad(|z| composite::per_token(z, &zt, t, kind).expect("composite"), &zs);
            assert_close(&format!("{kind:?} T={t} V={v} value"), &fv, &cv, 1e-10);
            assert_close(&format!("{kind:?} T={t} V={v} grad"), &fg, &cg, 1e-10);
            // f32 (fast exp/ln) against the f64 composite.
            let (fv, fg) = value_and_grad(
                |z| fused(z, &zt.to_dtype(DType::F32).expect("f32"), t, kind).expect("fused"),
                &zs.to_dtype(DType::F32).expect("f32"),
            );
            assert_close(&format!("{kind:?} T={t} V={v} f32 value"), &fv, &cv, 1e-5);
            assert_close(&format!("{kind:?} T={t} V={v} f32 grad"), &fg, &cg, 1e-5);
        }
    }
}

#[test]
fn value_and_grad_without_autograd_match_backward() {
    for dtype in [DType::F32, DType::F64] {
        for kind in [Divergence::Forward, Divergence::Reverse, Divergence::Jsd(0.4)] {
            let zs = logits(8, 301, 5, dtype);
            let zt = logits(8, 301, 6, dtype);
            let w = Tensor::from_vec(
                (0..8).map(|i| 0.25 + i as f64).collect::<Vec<_>>(),
                (2, 4),
                &Device::Cpu,
            )
            .and_then(|w| w.to_dtype(dtype))
            .expect("w");
            let (d, g) = per_token_and_grad(&zs, &zt, 1.5, kind, &w).expect("direct");
            let var = Var::from_tensor(&zs).expect("var");
            let per = fused(var.as_tensor(), &zt, 1.5, kind).expect("per");
            let grads = (per.clone() * &w)
                .and_then(|x| x.sum_all())
                .and_then(|x| x.backward())
                .expect("bwd");
            let want = grads.get(var.as_tensor()).expect("grad");
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
            assert_close(&format!("{kind:?} {dtype:?} value"), &values(&d), &values(&per), tol);
            assert_close(&format!("{kind:?} {dtype:?} grad"), &values(&g), &values(want), tol);
        }
    }
}

#[test]
fn teacher_gets_no_gradient_and_equal_inputs_give_zero() {
    let zs = Var::from_tensor(&logits(4, 50, 3, DType::F32)).expect("v");
    let zt = Var::from_tensor(&logits(4, 50, 4, DType::F32)).expect("v");
    let g = fused(zs.as_tensor(), zt.as_tensor(), 2.0, Divergence::Forward)
        .and_then(|x| x.sum_all())
        .and_then(|x| x.backward())
        .expect("bwd");
    assert!(g.get(zs.as_tensor()).is_some());
    assert!(g.get(zt.as_tensor()).is_none());
    let same = fused(zt.as_tensor(), zt.as_tensor(), 1.0, Divergence::Reverse)
        .and_then(|x| x.abs())
        .and_then(|x| x.max_all())
        .and_then(|x| x.to_scalar::<f32>())
        .expect("same");
    assert!(same < 1e-6, "{same}");
}

#[test]
fn nan_logits_give_nan_and_masked_logits_are_zero_mass() {
    let mut x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
    let zt = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
    x[3] = f32::NAN;
    let zs = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
    let d = fused(&zs, &zt, 1.0, Divergence::Forward).expect("d");
    assert!(d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0].is_nan());
    // A vocabulary entry masked to -inf on both sides carries no mass and no NaN.
    x[3] = f32::NEG_INFINITY;
    let zs = Tensor::from_vec(x, (1, 1, 8), &Device::Cpu).expect("t");
    for kind in [Divergence::Forward, Divergence::Reverse, Divergence::Jsd(0.5)] {
        let d = fused(&zs, &zs, 1.0, kind).expect("d");
        let d = d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0];
        assert!(d.abs() < 1e-6, "{kind:?}: {d}");
    }
}

#[test]
fn dispatch_follows_the_support_table() {
    let zs = logits(4, 20, 7, DType::F32);
    let zt = logits(4, 20, 8, DType::F64);
    // The teacher's dtype does not matter: it is cast to the student's.
    assert!(supports(&zs, &zt));
    let half = zs.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half, &zt));
    let want = values(&fused(&zs, &zt, 2.0, Divergence::Jsd(0.5)).expect("fused"));
    let got = values(&per_token(&half, &zt, 2.0, Divergence::Jsd(0.5)).expect("composite"));
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-2, "{a} vs {b}");
    }
    let err = per_token(&zs, &zt.narrow(2, 0, 5).expect("n"), 1.0, Divergence::Forward).expect_err("shapes");
    assert!(err.to_string().contains("differ in shape"), "{err}");
}
