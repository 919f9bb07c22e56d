use super::composite::{causal_mask, causal_softmax, softmax_last};
use super::*;
use crate::kernels::test_util::values;
use candle_core::{DType, Device, Var};
use rand::{Rng, SeedableRng};

#[test]
fn matches_composite_values_and_gradients_plain_and_causal() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let t = 13;
    let xs: Vec<f64> = (0..2 * 3 * t * t).map(|_| rng.random_range(-6.0..6.0)).collect();
    let cs: Vec<f64> = (0..2 * 3 * t * t).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x0 = Tensor::from_vec(xs, (2, 3, t, t), &Device::Cpu).expect("x");
    let c0 = Tensor::from_vec(cs, (2, 3, t, t), &Device::Cpu).expect("c");
    for dtype in [DType::F64, DType::F32] {
        for causal in [false, true] {
            let run = |fused: bool| -> (Vec<f64>, Vec<f64>) {
                let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("v");
                let y = if fused {
                    super::fused(x.as_tensor(), causal).expect("fused")
                } else if causal {
                    let m = causal_mask(t, dtype, &Device::Cpu).expect("mask");
                    causal_softmax(x.as_tensor(), &m).expect("c")
                } else {
                    softmax_last(x.as_tensor()).expect("c")
                };
                let g = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                (values(&y), values(g.get(x.as_tensor()).expect("grad")))
            };
            let ((fy, fg), (cy, cg)) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for i in 0..fy.len() {
                assert!(
                    (fy[i] - cy[i]).abs() <= tol,
                    "{dtype:?} causal={causal} y[{i}]: {} vs {}",
                    fy[i],
                    cy[i]
                );
                assert!(
                    (fg[i] - cg[i]).abs() <= tol,
                    "{dtype:?} causal={causal} dx[{i}]: {} vs {}",
                    fg[i],
                    cg[i]
                );
            }
        }
    }
}

#[test]
fn causal_mask_blocks_future() {
    let m = causal_mask(3, DType::F32, &Device::Cpu)
        .expect("m")
        .to_vec2::<f32>()
        .expect("v");
    assert_eq!(m[0][0], 0.0);
    assert!(m[0][1].is_infinite() && m[0][1] < 0.0);
    assert_eq!(m[2][1], 0.0);
}

/// CPU f32/f64 take the fused op, other dtypes the composite; both give the softmax.
#[test]
fn dispatch_follows_the_support_table() {
    let x = Tensor::new(&[[1f64, 2., 3.], [0., -1., 5.]], &Device::Cpu).expect("x");
    assert!(supports(&x) && supports(&x.to_dtype(DType::F32).expect("f32")));
    let half = x.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half));
    let want = softmax_last(&x).and_then(|y| y.to_vec2::<f64>()).expect("composite");
    for x in [x.clone(), half] {
        let got = super::softmax_last(&x)
            .and_then(|y| y.to_dtype(DType::F64))
            .and_then(|y| y.to_vec2::<f64>())
            .expect("dispatch");
        for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}

#[test]
fn softmax_and_log_softmax_match_reference() {
    // Reference: softmax([1, 2, 3]) = e^x / sum e^x = [0.09003057, 0.24472847, 0.66524096].
    let x = Tensor::new(&[[1f64, 2., 3.]], &Device::Cpu).expect("t");
    let p = super::softmax_last(&x).expect("sm").to_vec2::<f64>().expect("v");
    let want = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219];
    for (a, b) in p[0].iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    let lp = retort_core::ops::log_softmax(&x)
        .expect("lsm")
        .to_vec2::<f64>()
        .expect("v");
    for (a, b) in lp[0].iter().zip(want) {
        assert!((a - b.ln()).abs() < 1e-12);
    }
}
