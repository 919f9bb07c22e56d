//! The CUDA kernels: their PTX holds every entry point the `cuda.rs` files launch (checked on
//! any machine), and, where a GPU opens, each fused op on it agrees with the f64 composite on
//! the CPU (values and gradients). Without a GPU the device checks say so and pass.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::MODULES;
use crate::kernels::adamw::{self, AdamWStep};
use crate::kernels::divergence::{self, Divergence};
use crate::kernels::test_util::values;
use crate::kernels::topk_divergence::{self, TopkTail};
use crate::kernels::{cross_entropy, stats_dtype};

#[test]
fn every_module_holds_the_kernels_its_rust_side_launches() {
    let expect: [(&str, &[&str]); 14] = [
        ("retort-divergence", &["divergence_fwd", "divergence_bwd"]),
        ("retort-topk-divergence", &["topk_fwd", "topk_bwd"]),
        ("retort-cross-entropy", &["ce_fwd", "ce_bwd"]),
        ("retort-adamw", &["adamw", "sum_squares"]),
        (
            "retort-attention",
            &[
                "attn_delta",
                "attn_fwd_d32",
                "attn_fwd_d64",
                "attn_fwd_d128",
                "attn_fwd_d256",
                "attn_dq_d32",
                "attn_dq_d64",
                "attn_dq_d128",
                "attn_dq_d256",
                "attn_dkdv_d32",
                "attn_dkdv_d64",
                "attn_dkdv_d128",
                "attn_dkdv_d256",
            ],
        ),
        (
            "retort-attention-mma",
            &["attn_fwd_mma_d32", "attn_fwd_mma_d64", "attn_fwd_mma_d128"],
        ),
        (
            "retort-attention-mma-bwd",
            &[
                "attn_dq_mma_d32",
                "attn_dq_mma_d64",
                "attn_dq_mma_d128",
                "attn_dkdv_mma_d32",
                "attn_dkdv_mma_d64",
                "attn_dkdv_mma_d128",
            ],
        ),
        ("retort-rope", &["rope"]),
        (
            "retort-rms-norm",
            &["rms_fwd", "rms_bwd", "rms_dw_partial", "rms_dw_finish"],
        ),
        ("retort-swiglu", &["swiglu_fwd", "swiglu_bwd"]),
        ("retort-bias", &["bias_fwd", "sum_rows_partial", "sum_rows_finish"]),
        ("retort-gelu", &["gelu_fwd", "gelu_bwd"]),
        (
            "retort-layer-norm",
            &["ln_fwd", "ln_bwd", "ln_dwb_partial", "ln_dwb_finish"],
        ),
        ("retort-softmax", &["softmax_fwd", "softmax_bwd"]),
    ];
    assert_eq!(MODULES.len(), expect.len());
    for (module, (name, kernels)) in MODULES.iter().zip(expect) {
        assert_eq!(module.name, name);
        assert!(module.ptx.contains(".target sm_80"), "{name}: not compute_80 PTX");
        for k in kernels {
            let dtypes: &[&str] = if *k == "adamw" {
                &["f32", "f64"]
            } else if k.contains("_mma_") {
                &["f16", "bf16"] // tensor cores: half storage only
            } else {
                &["f32", "f64", "f16", "bf16"]
            };
            for d in dtypes {
                let entry = format!(".entry {k}_{d}(");
                assert!(module.ptx.contains(&entry), "{name} lacks `{entry}`");
            }
        }
    }
}

/// The first GPU, or `None` (and a note) where none opens.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device opens ({e}): the GPU checks are skipped");
            None
        }
    }
}

/// Deterministic pseudo-random values in `[-scale, scale)`.
fn noise(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `(f(z) [rows], d(sum_r w_r f(z)_r)/dz)` as f64 values.
fn value_and_grad(f: &dyn Fn(&Tensor) -> Result<Tensor>, z: &Tensor, w: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = Var::from_tensor(z)?;
    let out = f(var.as_tensor())?;
    let loss = (out.to_dtype(DType::F64)? * w.to_dtype(DType::F64)?.to_device(out.device())?)?.sum_all()?;
    let grads = loss.backward()?;
    let g = grads.get(var.as_tensor()).expect("a gradient").clone();
    Ok((values(&out), values(&g)))
}

/// Normwise relative error `max|x - r| / max|r|`, infinite where `x` is not finite and `r` is.
fn error(x: &[f64], r: &[f64]) -> f64 {
    assert_eq!(x.len(), r.len());
    let scale = r.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    x.iter().zip(r).fold(0f64, |m, (a, b)| {
        if b.is_finite() && !a.is_finite() {
            f64::INFINITY
        } else {
            m.max((a - b).abs() / scale)
        }
    })
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-10,
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        _ => 2e-2,
    }
}

/// Checks `op` on the GPU in each dtype against `op` on the CPU in f64 (the composite there:
/// `reference`), for logits `[rows, v]` and row weights with zeros.
fn check(
    gpu: &Device,
    what: &str,
    op: &dyn Fn(&Tensor) -> Result<Tensor>,
    reference: &dyn Fn(&Tensor) -> Result<Tensor>,
) {
    let (rows, v) = (7, 3001);
    let z = Tensor::from_vec(noise(rows * v, 1, 4.0), (rows, v), &Device::Cpu).expect("z");
    let w: Vec<f64> = noise(rows, 2, 1.0)
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 3 == 0 { 0.0 } else { x.abs() })
        .collect();
    let w = Tensor::from_vec(w, rows, &Device::Cpu).expect("w");
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        // The reference sees the same rounded inputs.
        let zd = z.to_dtype(dtype).expect("cast");
        let (rv, rg) = value_and_grad(reference, &zd.to_dtype(DType::F64).expect("f64"), &w).expect("reference");
        let (gv, gg) = value_and_grad(op, &zd.to_device(gpu).expect("to gpu"), &w).expect(what);
        let (ev, eg) = (error(&gv, &rv), error(&gg, &rg));
        assert!(
            ev <= tolerance(dtype) && eg <= tolerance(dtype),
            "{what} {dtype:?}: value error {ev:e}, gradient error {eg:e}"
        );
    }
}

#[test]
fn divergences_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let teacher = Tensor::from_vec(noise(7 * 3001, 3, 4.0), (7, 3001), &Device::Cpu).expect("zt");
    for kind in [
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd(0.3),
        Divergence::SkewForward(0.1),
        Divergence::SkewReverse(0.9),
        Divergence::Tvd,
    ] {
        for t in [1.0, 2.0] {
            let on = |z: &Tensor| {
                let zt = teacher.to_dtype(z.dtype())?.to_device(z.device())?;
                divergence::per_token(z, &zt, t, kind)
            };
            let reference = |z: &Tensor| divergence::composite::per_token(z, &teacher, t, kind);
            check(&gpu, &format!("{kind:?} T={t}"), &on, &reference);
        }
    }
}

#[test]
fn cross_entropy_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let targets: Vec<u32> = (0..7u32).map(|i| (i * 409) % 3001).collect();
    let y = Tensor::new(targets.as_slice(), &Device::Cpu).expect("y");
    for eps in [0.0, 0.1] {
        let on = |z: &Tensor| cross_entropy::per_token(z, &y.to_device(z.device())?, eps);
        let reference = |z: &Tensor| cross_entropy::composite::per_token(z, &y, eps);
        check(&gpu, &format!("ce eps={eps}"), &on, &reference);
    }
}

#[test]
fn topk_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let k = 12;
    let ids: Vec<u32> = (0..7 * k as u32).map(|i| (i * 7919) % 3001).collect();
    let ids = Tensor::from_vec(ids, (7, k), &Device::Cpu).expect("ids");
    // Teacher log-probs of a proper distribution over k + 1 outcomes; one entry marked -inf
    // per row as the union marks duplicates.
    let lp: Vec<f64> = noise(7 * k, 5, 2.0)
        .iter()
        .enumerate()
        .map(|(i, x)| if i % k == 3 { f64::NEG_INFINITY } else { x - 4.0 })
        .collect();
    let lpt = Tensor::from_vec(lp, (7, k), &Device::Cpu).expect("lpt");
    for tail in [TopkTail::Bucket, TopkTail::Renormalize] {
        for t in [1.0, 2.0] {
            let on = |z: &Tensor| {
                let dev = z.device();
                let l = lpt.to_dtype(stats_dtype(z.dtype()))?.to_device(dev)?;
                topk_divergence::per_token(z, &ids.to_device(dev)?, &l, tail, t)
            };
            let reference = |z: &Tensor| topk_divergence::composite::per_token(z, &ids, &lpt, tail, t);
            check(&gpu, &format!("topk {tail:?} T={t}"), &on, &reference);
        }
    }
}

#[test]
fn adamw_on_the_gpu_matches_the_cpu_in_place() {
    let Some(gpu) = gpu() else { return };
    let n = 70_001;
    let t = |seed, scale| Tensor::from_vec(noise(n, seed, scale), n, &Device::Cpu).expect("t");
    let (w, g, m, v) = (t(1, 1.0), t(2, 0.1), t(3, 0.01), t(4, 0.001).abs().expect("abs"));
    let s = AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        eps: 1e-8,
        lr: 1e-3,
        weight_decay: 0.1,
        grad_scale: 0.5,
    };
    for dtype in [DType::F32, DType::F64] {
        let c = |x: &Tensor| x.to_dtype(dtype).expect("cast");
        let (rw, rm, rv) = adamw::composite::update(&c(&w), &c(&g), &c(&m), &c(&v), s).expect("reference");
        let on = |x: &Tensor| c(x).to_device(&gpu).expect("to gpu");
        let wv = Var::from_tensor(&on(&w)).expect("var");
        let (mut gm, mut gv) = (on(&m), on(&v));
        adamw::adamw_step(&wv, &on(&g), &mut gm, &mut gv, s).expect("step");
        for (got, want, name) in [(wv.as_tensor(), &rw, "w"), (&gm, &rm, "m"), (&gv, &rv, "v")] {
            let e = error(&values(got), &values(want));
            assert!(e <= tolerance(dtype), "adamw {dtype:?} {name}: error {e:e}");
        }
    }
}

/// The scalars of the group checks: step 10 with decay and clipping.
const GROUP_STEP: AdamWStep = AdamWStep {
    beta1: 0.9,
    beta2: 0.95,
    bias_correction1: 0.651_321_559_9,
    bias_correction2: 0.401_263_060_6,
    eps: 1e-8,
    lr: 1e-2,
    weight_decay: 0.1,
    grad_scale: 0.7,
};

#[test]
fn a_group_of_parameters_updated_in_one_launch_matches_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let sizes = [70_001, 7, 300_000];
    let t = |n, seed, scale| Tensor::from_vec(noise(n, seed, scale), n, &Device::Cpu).expect("t");
    for dtype in [DType::F32, DType::F64] {
        let c = |x: &Tensor| x.to_dtype(dtype).expect("cast");
        let on = |x: &Tensor| c(x).to_device(&gpu).expect("to gpu");
        let host: Vec<[Tensor; 4]> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let seed = 10 * i as u64;
                let v = t(n, seed + 4, 0.001).abs().expect("abs");
                [t(n, seed + 1, 1.0), t(n, seed + 2, 0.1), t(n, seed + 3, 0.01), v]
            })
            .collect();
        let mut state: Vec<(Var, Tensor, Tensor)> = host
            .iter()
            .map(|[w, _, m, v]| (Var::from_tensor(&on(w)).expect("var"), on(m), on(v)))
            .collect();
        let grads: Vec<Tensor> = host.iter().map(|q| on(&q[1])).collect();
        let mut slots: Vec<adamw::AdamWSlot<'_>> = state
            .iter_mut()
            .zip(&grads)
            .map(|((w, m, v), g)| adamw::AdamWSlot { w: &*w, g, m, v })
            .collect();
        adamw::adamw_group_step(&mut slots, GROUP_STEP).expect("group step");
        for ((w, m, v), [hw, hg, hm, hv]) in state.iter().zip(&host) {
            let (rw, rm, rv) = adamw::composite::update(&c(hw), &c(hg), &c(hm), &c(hv), GROUP_STEP).expect("reference");
            for (got, want, name) in [(w.as_tensor(), &rw, "w"), (m, &rm, "m"), (v, &rv, "v")] {
                let e = error(&values(got), &values(want));
                assert!(
                    e <= tolerance(dtype),
                    "group adamw {dtype:?} {name}[{}]: error {e:e}",
                    got.elem_count()
                );
            }
        }
    }
}

#[test]
fn moments_sharing_a_buffer_are_refused() {
    let Some(gpu) = gpu() else { return };
    let w = Var::from_tensor(&Tensor::ones(100, DType::F32, &gpu).expect("w")).expect("var");
    let g = Tensor::ones(100, DType::F32, &gpu).expect("g");
    let mut m = Tensor::zeros(100, DType::F32, &gpu).expect("m");
    let mut v = m.clone();
    let err = adamw::adamw_step(&w, &g, &mut m, &mut v, GROUP_STEP).expect_err("shared moments");
    assert!(err.to_string().contains("separate buffers"), "{err}");
}

#[test]
fn sums_of_squares_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let sizes = [1_000_003, 5, 70_001];
    for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
        let host: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::from_vec(noise(n, i as u64, 3.0), n, &Device::Cpu).and_then(|t| t.to_dtype(dtype)))
            .collect::<Result<_>>()
            .expect("inputs");
        let want = adamw::composite::sum_squares(&host).expect("reference");
        let on: Vec<Tensor> = host.iter().map(|x| x.to_device(&gpu).expect("to gpu")).collect();
        let got = adamw::sum_squares(&on).expect("sums");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Both in f64 over the same (rounded) values, summed in another order.
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{dtype:?} tensor {i}: {a} vs {b}");
        }
    }
}

/// `op(inputs)` and the gradients of `sum(op(inputs) * gy)` w.r.t. every input, as f64.
fn op_and_grads(op: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], gy: &Tensor) -> Result<Vec<Vec<f64>>> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts)?;
    let gy = gy.to_dtype(y.dtype())?.to_device(y.device())?;
    let grads = (y.to_dtype(DType::F64)? * gy.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let mut out = vec![values(&y)];
    for t in &ts {
        out.push(values(grads.get(t).expect("a gradient")));
    }
    Ok(out)
}

/// Checks a row op on the GPU in each dtype against the same op on the CPU in f64 (the fused
/// CPU op) on the same rounded inputs: its value and the gradients of all its inputs.
fn check_rows(
    gpu: &Device,
    what: &str,
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    out_dims: &[usize],
) {
    let n: usize = out_dims.iter().product();
    let gy = Tensor::from_vec(noise(n, 9, 1.0), out_dims, &Device::Cpu).expect("gy");
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let rounded: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).expect("cast")).collect();
        let gyd = gy.to_dtype(dtype).expect("cast");
        let cpu: Vec<Tensor> = rounded.iter().map(|t| t.to_dtype(DType::F64).expect("f64")).collect();
        let want = op_and_grads(op, &cpu, &gyd).expect("reference");
        let on: Vec<Tensor> = rounded.iter().map(|t| t.to_device(gpu).expect("to gpu")).collect();
        let got = op_and_grads(op, &on, &gyd).expect(what);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = error(g, w);
            // The weight and bias gradients sum over rows: a looser bound in half precision.
            let tol = if i > 1 {
                4.0 * tolerance(dtype)
            } else {
                tolerance(dtype)
            };
            assert!(e <= tol, "{what} {dtype:?} output {i}: error {e:e}");
        }
    }
}

#[test]
fn the_row_ops_on_the_gpu_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let (rows, d) = (37, 1_000);
    let t = |dims: &[usize], seed, scale| {
        let n = dims.iter().product();
        Tensor::from_vec(noise(n, seed, scale), dims, &Device::Cpu).expect("t")
    };
    let (x, w, b) = (t(&[rows, d], 1, 3.0), t(&[d], 2, 1.5), t(&[d], 3, 1.0));
    let rms = |v: &[Tensor]| crate::kernels::rms_norm::rms_norm(&v[0], &v[1], 1e-5);
    check_rows(&gpu, "rms_norm", &rms, &[x.clone(), w.clone()], &[rows, d]);
    let ln = |v: &[Tensor]| crate::kernels::layer_norm::layer_norm(&v[0], &v[1], &v[2], 1e-5);
    check_rows(&gpu, "layer_norm", &ln, &[x.clone(), w.clone(), b.clone()], &[rows, d]);
    let bias = |v: &[Tensor]| crate::kernels::bias::add_bias(&v[0], &v[1]);
    check_rows(&gpu, "bias", &bias, &[x.clone(), b.clone()], &[rows, d]);
    let swiglu = |v: &[Tensor]| crate::kernels::swiglu::swiglu(&v[0], &v[1]);
    check_rows(&gpu, "swiglu", &swiglu, &[x.clone(), t(&[rows, d], 4, 2.0)], &[rows, d]);
    let gelu = |v: &[Tensor]| crate::kernels::gelu::gelu(&v[0]);
    check_rows(&gpu, "gelu", &gelu, std::slice::from_ref(&x), &[rows, d]);
    let softmax = |v: &[Tensor]| crate::kernels::softmax::softmax_last(&v[0]);
    check_rows(&gpu, "softmax", &softmax, &[x], &[rows, d]);
    let scores = t(&[2, 3, 40, 40], 5, 4.0);
    let causal = |v: &[Tensor]| {
        let mask = crate::kernels::softmax::causal_mask(40, v[0].dtype(), v[0].device())?;
        crate::kernels::softmax::causal_softmax(&v[0], &mask)
    };
    check_rows(&gpu, "causal softmax", &causal, &[scores], &[2, 3, 40, 40]);
}
