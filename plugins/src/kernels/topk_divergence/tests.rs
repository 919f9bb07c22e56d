use super::*;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};
use retort_core::model::dense_topk;
use retort_core::ops::log_softmax;

fn logits(rows: usize, v: usize, seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f64> = (0..rows * v).map(|_| rng.random_range(-4.0..4.0)).collect();
    Tensor::from_vec(x, (2, rows / 2, v), &Device::Cpu).expect("logits")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("vec")
}

fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(z).expect("var");
    let per = f(var.as_tensor());
    let n = per.elem_count();
    let w: Vec<f64> = (0..n).map(|i| 0.25 + (i % 4) as f64).collect();
    let w = Tensor::from_vec(w, per.dims(), &Device::Cpu)
        .and_then(|w| w.to_dtype(per.dtype()))
        .expect("w");
    let g = (per.clone() * w)
        .and_then(|x| x.sum_all())
        .and_then(|x| x.backward())
        .expect("bwd");
    (flat(&per), flat(g.get(var.as_tensor()).expect("grad")))
}

fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= rel * scale, "{what}[{i}]: fused {x} vs composite {y}");
    }
}

#[test]
fn matches_composite_values_and_gradients() {
    for (tail, t, v, k) in [
        (TopkTail::Bucket, 1.0, 300, 16),
        (TopkTail::Bucket, 1.0, 9, 9),
        (TopkTail::Renormalize, 2.0, 300, 16),
        (TopkTail::Renormalize, 0.8, 40, 5),
    ] {
        let zs = logits(6, v, 11);
        let zt = logits(6, v, 12);
        let (ids, lp) = dense_topk(&zt, k).expect("topk");
        let lp = lp.to_dtype(DType::F64).expect("f64");
        let composite = |z: &Tensor| {
            let ls = log_softmax(&(z / t).expect("div")).expect("lsm");
            composite::from_log_probs(&ls, &ids, &lp, None, tail, t).expect("composite")
        };
        let (cv, cg) = value_and_grad(composite, &zs);
        let (fv, fg) = value_and_grad(|z| fused(z, &ids, &lp, tail, t).expect("fused"), &zs);
        assert_close(&format!("{tail:?} V={v} value"), &fv, &cv, 1e-10);
        assert_close(&format!("{tail:?} V={v} grad"), &fg, &cg, 1e-10);
        let zs32 = zs.to_dtype(DType::F32).expect("f32");
        let (fv, fg) = value_and_grad(|z| fused(z, &ids, &lp, tail, t).expect("fused"), &zs32);
        assert_close(&format!("{tail:?} V={v} f32 value"), &fv, &cv, 1e-5);
        assert_close(&format!("{tail:?} V={v} f32 grad"), &fg, &cg, 1e-5);
    }
}

#[test]
fn skipped_entries_match_the_composite_validity_mask() {
    let zs = logits(4, 30, 21);
    let zt = logits(4, 30, 22);
    let (ids, lp) = dense_topk(&zt, 6).expect("topk");
    let lp = lp.to_dtype(DType::F64).expect("f64");
    // Drop entries 1 and 4 of every row.
    let mask: Vec<f64> = (0..4 * 6)
        .map(|i| if i % 6 == 1 || i % 6 == 4 { 0.0 } else { 1.0 })
        .collect();
    let valid = Tensor::from_vec(mask, (2, 2, 6), &Device::Cpu).expect("m");
    let neg = Tensor::full(f64::NEG_INFINITY, lp.dims(), &Device::Cpu).expect("inf");
    let lp_marked = valid.ne(0.0).and_then(|m| m.where_cond(&lp, &neg)).expect("where");
    for tail in [TopkTail::Bucket, TopkTail::Renormalize] {
        let composite = |z: &Tensor| {
            let ls = log_softmax(z).expect("lsm");
            composite::from_log_probs(&ls, &ids, &lp, Some(&valid), tail, 1.0).expect("composite")
        };
        let (cv, cg) = value_and_grad(composite, &zs);
        let (fv, fg) = value_and_grad(|z| fused(z, &ids, &lp_marked, tail, 1.0).expect("fused"), &zs);
        assert_close(&format!("{tail:?} value"), &fv, &cv, 1e-9);
        assert_close(&format!("{tail:?} grad"), &fg, &cg, 1e-9);
    }
}

#[test]
fn out_of_range_ids_are_an_error() {
    let zs = logits(2, 5, 1);
    let ids = Tensor::new(&[[[7u32]]], &Device::Cpu).expect("ids");
    let ids = ids.broadcast_as((2, 1, 1)).and_then(|i| i.contiguous()).expect("b");
    let lp = Tensor::zeros((2, 1, 1), DType::F64, &Device::Cpu).expect("lp");
    let err = fused(&zs, &ids, &lp, TopkTail::Bucket, 1.0).expect_err("must fail");
    assert!(err.to_string().contains("outside the student's vocabulary"), "{err}");
}

#[test]
fn dispatch_follows_the_support_table() {
    let zs = logits(4, 30, 31);
    let (ids, lp) = dense_topk(&logits(4, 30, 32), 6).expect("topk");
    // Entry 2 of every row marked as skipped.
    let skip: Vec<f64> = (0..4 * 6)
        .map(|i| if i % 6 == 2 { f64::NEG_INFINITY } else { 0.0 })
        .collect();
    let lp = (lp.to_dtype(DType::F64).expect("f64") + Tensor::from_vec(skip, (2, 2, 6), &Device::Cpu).expect("s"))
        .expect("marked");
    assert!(supports(&zs));
    let half = zs.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&half));
    for tail in [TopkTail::Bucket, TopkTail::Renormalize] {
        let want = flat(&fused(&zs, &ids, &lp, tail, 1.5).expect("fused"));
        // The composite as the fallback reads the same `-inf` marks.
        let same = flat(&composite::per_token(&zs, &ids, &lp, tail, 1.5).expect("composite"));
        assert_close(&format!("{tail:?} composite"), &same, &want, 1e-9);
        let got = flat(&per_token(&half, &ids, &lp, tail, 1.5).expect("dispatch"));
        assert_close(&format!("{tail:?} bf16"), &got, &want, 5e-2);
    }
}
