use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

/// `sum(per * mask) / sum(mask)`: the mean over the counted tokens.
fn masked_mean(per: &Tensor, mask: &Tensor) -> Tensor {
    ((per * mask).and_then(|t| t.sum_all()).expect("sum") / mask.sum_all().expect("count")).expect("mean")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("vec")
}

#[test]
fn matches_composite_values_and_gradients_with_mask_and_smoothing() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for (v, eps) in [(65, 0.0), (1000, 0.1), (3, 0.3)] {
        let x: Vec<f64> = (0..8 * v).map(|_| rng.random_range(-5.0..5.0)).collect();
        let y: Vec<u32> = (0..8).map(|_| rng.random_range(0..v as u32)).collect();
        let z = Tensor::from_vec(x, (2, 4, v), &Device::Cpu).expect("z");
        let y = Tensor::from_vec(y, (2, 4), &Device::Cpu).expect("y");
        let mask = Tensor::new(&[[1.0f64, 1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 0.0]], &Device::Cpu).expect("m");
        for dtype in [DType::F64, DType::F32] {
            let run = |is_fused: bool| {
                let var = Var::from_tensor(&z.to_dtype(dtype).expect("d")).expect("v");
                let m = mask.to_dtype(dtype).expect("m");
                let loss = if is_fused {
                    let per = fused(var.as_tensor(), &y, eps).expect("fused");
                    masked_mean(&per, &m)
                } else {
                    let z64 = var.as_tensor().to_dtype(DType::F64).expect("d");
                    masked_mean(&composite::per_token(&z64, &y, eps).expect("composite"), &mask)
                };
                let g = loss.backward().expect("bwd");
                (flat(&loss)[0], flat(g.get(var.as_tensor()).expect("grad")))
            };
            let ((fv, fg), (cv, cg)) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            assert!((fv - cv).abs() <= tol * cv.abs(), "V={v} {dtype:?}: {fv} vs {cv}");
            let scale = cg.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (i, (a, b)) in fg.iter().zip(&cg).enumerate() {
                assert!((a - b).abs() <= tol * scale, "V={v} {dtype:?} grad[{i}]: {a} vs {b}");
            }
        }
    }
}

#[test]
fn out_of_range_target_is_an_error() {
    let z = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).expect("z");
    let y = Tensor::new(&[[0u32, 3]], &Device::Cpu).expect("y");
    let err = fused(&z, &y, 0.0).expect_err("must fail");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn dispatch_follows_the_support_table() {
    let z = Tensor::new(&[[1f32, 2., 3.], [0., -1., 5.]], &Device::Cpu).expect("z");
    let y = Tensor::new(&[2u32, 0], &Device::Cpu).expect("y");
    assert!(supports(&z) && supports(&z.to_dtype(DType::F64).expect("f64")));
    let half = z.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half));
    let want = flat(&fused(&z, &y, 0.1).expect("fused"));
    let got = flat(&per_token(&half, &y, 0.1).expect("composite"));
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-2, "{a} vs {b}");
    }
}
