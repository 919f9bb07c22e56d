use super::composite;
use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};

#[test]
fn matches_candle_gelu_values_and_gradients() {
    let xs: Vec<f64> = (0..40_001).map(|i| (i as f64 - 20_000.0) / 2_000.0).collect();
    let x0 = Tensor::from_vec(xs, 40_001, &Device::Cpu).expect("x");
    let w = x0.sin().expect("w");
    for dtype in [DType::F64, DType::F32] {
        let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("v");
        let w = w.to_dtype(dtype).expect("d");
        let run = |y: Tensor| -> (Vec<f64>, Vec<f64>) {
            let g = (&y * &w)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            (values(&y), values(g.get(x.as_tensor()).expect("grad")))
        };
        let (fy, fg) = run(fused(x.as_tensor()).expect("fused"));
        let (cy, cg) = run(composite::gelu(x.as_tensor()).expect("candle"));
        // The exact derivative, by central differences of the fused forward (f64 only).
        if dtype == DType::F64 {
            for &i in &[0usize, 9_000, 19_999, 20_001, 23_456, 40_000] {
                let at = |d: f64| -> f64 {
                    let v = x0.to_vec1::<f64>().expect("v")[i] + d;
                    fused(&Tensor::new(&[v], &Device::Cpu).expect("t"))
                        .and_then(|y| y.to_vec1::<f64>())
                        .expect("y")[0]
                };
                let num = (at(1e-6) - at(-1e-6)) / 2e-6;
                let ana = fg[i] / w.to_dtype(DType::F64).and_then(|w| w.to_vec1::<f64>()).expect("w")[i];
                assert!((num - ana).abs() < 1e-7, "x[{i}]: numeric {num} vs analytic {ana}");
            }
        }
        // Relative to max(|value|, 1): GELU and its slope are O(1) at most.
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for i in 0..fy.len() {
            assert!(
                (fy[i] - cy[i]).abs() <= tol * cy[i].abs().max(1.0),
                "{dtype:?} y[{i}]: {} vs {}",
                fy[i],
                cy[i]
            );
            // candle's GELU backward uses 6-digit constants (0.398942, 0.0535161): 1e-5.
            assert!(
                (fg[i] - cg[i]).abs() <= 1e-5 * cg[i].abs().max(1.0),
                "{dtype:?} dy[{i}]: {} vs {}",
                fg[i],
                cg[i]
            );
        }
    }
}

#[test]
fn dispatch_follows_the_support_table() {
    let x = Tensor::new(&[-1f32, 0.5, 2.0], &Device::Cpu).expect("x");
    assert!(supports(&x));
    let half = x.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&half));
    assert_eq!(gelu(&half).expect("composite").dtype(), DType::BF16);
}
