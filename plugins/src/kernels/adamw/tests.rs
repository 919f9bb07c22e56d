use super::*;
use candle_core::Device;

/// Three steps from zero moments match the composite update in f64 and f32, with and
/// without decay and clipping.
#[test]
fn matches_the_composed_update() {
    let dev = Device::Cpu;
    let n = 40_003; // more than two work items, not a multiple of one
    let base = Tensor::arange(0f64, n as f64, &dev).expect("a");
    for dtype in [DType::F64, DType::F32] {
        for (wd, scale) in [(0.0, 1.0), (0.1, 0.37)] {
            let mut wf = (&base * 0.001)
                .and_then(|t| t.sin())
                .and_then(|t| t.to_dtype(dtype))
                .expect("w");
            let mut mf = wf.zeros_like().expect("m");
            let mut vf = wf.zeros_like().expect("v");
            let (mut wc, mut mc, mut vc) = (wf.clone(), mf.clone(), vf.clone());
            for t in 1..=3 {
                let g = (&base * (0.003 * t as f64))
                    .and_then(|x| x.cos())
                    .and_then(|x| x.to_dtype(dtype))
                    .expect("g");
                let s = AdamWStep {
                    beta1: 0.9,
                    beta2: 0.95,
                    bias_correction1: 1.0 - 0.9f64.powi(t),
                    bias_correction2: 1.0 - 0.95f64.powi(t),
                    eps: 1e-8,
                    lr: 3e-3,
                    weight_decay: wd,
                    grad_scale: scale,
                };
                (wf, mf, vf) = fused(&wf, &g, &mf, &vf, s).expect("fused");
                (wc, mc, vc) = composite::update(&wc, &g, &mc, &vc, s).expect("composite");
            }
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            for (what, a, b) in [("w", &wf, &wc), ("m", &mf, &mc), ("v", &vf, &vc)] {
                let a: Vec<f64> = a.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("a");
                let b: Vec<f64> = b.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("b");
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(1e-3),
                        "{dtype:?} wd {wd} {what}[{i}]: {x} vs {y}"
                    );
                }
            }
        }
    }
}

/// The scalars of a first step with decay `wd` (no clipping).
fn first_step(wd: f64) -> AdamWStep {
    AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        eps: 1e-8,
        lr: 1e-3,
        weight_decay: wd,
        grad_scale: 1.0,
    }
}

#[test]
fn mismatched_operands_are_refused() {
    let dev = Device::Cpu;
    let w = Tensor::zeros(4, DType::F32, &dev).expect("w");
    let g = Tensor::zeros(5, DType::F32, &dev).expect("g");
    let s = first_step(0.0);
    assert!(adamw_update(&w, &g, &w, &w, s).is_err());
    let g64 = Tensor::zeros(4, DType::F64, &dev).expect("g");
    assert!(!supports(&w, &g64, &w, &w));
}

#[test]
fn dispatch_follows_the_support_table() {
    let dev = Device::Cpu;
    let w = Tensor::new(&[1f32, -2.0, 0.5], &dev).expect("w");
    let s = first_step(0.1);
    assert!(supports(&w, &w, &w, &w));
    let half = w.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&half, &half, &half, &half));
    assert!(fused(&half, &half, &half, &half, s).is_err());
    let (w2, _, _) = adamw_update(&half, &half, &half, &half, s).expect("composite");
    assert_eq!(w2.dtype(), DType::BF16);
}
