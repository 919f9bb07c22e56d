//! The fused LM-head loss against the unfused path (full logits `h W^T`, each term's
//! `compute`, candle's backward): values and gradients w.r.t. the head's input and weight, for
//! every logit term, with a padding mask, router token weights, `T != 1`, several chunk sizes,
//! and each form of teacher (dense logits, its head, its top-k only).

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use retort_core::registry::Factory;
use retort_core::taps::{LM_HEAD_BF16_PRODUCTS, LM_HEAD_HIDDEN, LM_HEAD_WEIGHT};
use retort_core::{Batch, BuildContext, LossTerm, Outputs, Params, Progress, Registry, StepContext};

use super::{chunk_tokens, fused_loss, HeadTerm, WeightGradient};
use crate::kernels::leaf_grads::LeafGrads;

const B: usize = 2;
const S: usize = 5;
const H: usize = 6;
const V: usize = 40;
const K: usize = 8;

fn registry() -> Registry {
    let mut reg = Registry::empty();
    for f in inventory::iter::<Factory<dyn retort_core::Schedule>> {
        reg.schedules.register(f, "built-in").expect("schedule");
    }
    reg
}

fn term(kind: &str, params: serde_json::Value, sparse: bool) -> Box<dyn LossTerm> {
    let reg = registry();
    let mut ctx = BuildContext::new(&reg, Device::Cpu, 0);
    ctx.teacher_topk = sparse.then_some(K);
    let f = inventory::iter::<Factory<dyn LossTerm>>
        .into_iter()
        .find(|f| f.kind == kind)
        .expect("kind");
    let p = Params::new("loss[0]", params.as_object().expect("object").clone());
    (f.build)(&p, &ctx).expect("build")
}

/// The teacher's side of the step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TeacherForm {
    /// Dense logits (and the `topk.K` taps).
    Dense,
    /// Its head's input and weight (and the `topk.K` taps).
    Head,
    /// Only `topk.K` (a cached teacher): logits `[b, s, 0]`.
    Sparse,
}

struct Fixture {
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor,
    token_weights: Tensor,
    targets: Tensor,
    /// The student's head multiplies in bf16 products (`lm_head.bf16_products`).
    student_bf16: bool,
}

fn fixture(dtype: DType) -> Fixture {
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut draw = |dims: &[usize], scale: f64| -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, dims, &dev)
            .and_then(|t| t.to_dtype(dtype))
            .expect("draw")
    };
    let (hidden, weight) = (draw(&[B, S, H], 1.0), draw(&[V, H], 1.0));
    let (teacher_hidden, teacher_weight) = (draw(&[B, S, H + 2], 1.0), draw(&[V, H + 2], 1.0));
    let token_weights = draw(&[B, S], 2.0).abs().expect("abs");
    let mask = Tensor::new(&[[1f64, 1., 0., 1., 1.], [1., 1., 1., 0., 0.]], &dev)
        .and_then(|m| m.to_dtype(dtype))
        .expect("mask");
    let targets: Vec<u32> = (0..B * S).map(|i| ((i * 13 + 5) % V) as u32).collect();
    let targets = Tensor::from_vec(targets, (B, S), &dev).expect("targets");
    Fixture {
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        mask,
        token_weights,
        targets,
        student_bf16: false,
    }
}

fn teacher_outputs(f: &Fixture, form: TeacherForm) -> Outputs {
    let weight = f.teacher_weight.to_dtype(f.teacher_hidden.dtype()).expect("weight");
    let zt = f.teacher_hidden.broadcast_matmul(&weight.t().expect("t")).expect("zt");
    let (ids, lp) = retort_core::model::dense_topk(&zt, K).expect("topk");
    let mut out = match form {
        TeacherForm::Dense => Outputs::logits_only(zt),
        TeacherForm::Head => {
            let mut o = Outputs::logits_only(Tensor::zeros((B, S, 0), zt.dtype(), zt.device()).expect("z"));
            o.taps.insert(LM_HEAD_HIDDEN.into(), f.teacher_hidden.clone());
            o.taps.insert(LM_HEAD_WEIGHT.into(), f.teacher_weight.clone());
            o
        }
        TeacherForm::Sparse => Outputs::logits_only(Tensor::zeros((B, S, 0), zt.dtype(), zt.device()).expect("z")),
    };
    out.taps.insert(format!("topk.{K}.ids"), ids);
    out.taps.insert(format!("topk.{K}.logprobs"), lp);
    out
}

/// `(total, values, dL/dhidden, dL/dweight)`, fused in chunks of `chunk` (`dL/dW` in the graph
/// or returned and added to the gradients, as the engine does) or (`None`) unfused.
fn run(
    terms: &[(&dyn LossTerm, f64)],
    f: &Fixture,
    form: TeacherForm,
    weighted: bool,
    chunk: Option<(usize, WeightGradient)>,
) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (h, w) = (
        Var::from_tensor(&f.hidden).expect("h"),
        Var::from_tensor(&f.weight).expect("w"),
    );
    let batch = Batch {
        input_ids: f.targets.clone(),
        targets: f.targets.clone(),
        mask: weighted.then(|| f.mask.clone()),
        source: None,
    };
    let teacher = teacher_outputs(f, form);
    let student = match chunk {
        Some(_) => {
            let mut o = Outputs::logits_only(Tensor::zeros((B, S, 0), f.hidden.dtype(), &Device::Cpu).expect("z"));
            o.taps.insert(LM_HEAD_HIDDEN.into(), h.as_tensor().clone());
            o.taps.insert(LM_HEAD_WEIGHT.into(), w.as_tensor().clone());
            if f.student_bf16 {
                o.taps.insert(
                    LM_HEAD_BF16_PRODUCTS.into(),
                    Tensor::new(0f32, &Device::Cpu).expect("marker"),
                );
            }
            o
        }
        // The unfused bf16 head: the linear layer in bf16 products, forward and backward.
        None if f.student_bf16 => Outputs::logits_only(
            crate::kernels::cpu::linear::linear_t_bf16(h.as_tensor(), w.as_tensor(), None).expect("z"),
        ),
        None => Outputs::logits_only(
            h.as_tensor()
                .broadcast_matmul(&w.as_tensor().t().expect("t"))
                .expect("z"),
        ),
    };
    let dense_teacher;
    let teacher = match (chunk, form) {
        // The unfused path sees the teacher's logits made whole.
        (None, TeacherForm::Head) => {
            dense_teacher = teacher_outputs(f, TeacherForm::Dense);
            &dense_teacher
        }
        _ => &teacher,
    };
    let ctx = StepContext {
        batch: &batch,
        student: &student,
        teacher: Some(teacher),
        progress: Progress::new(3, 10),
        token_weights: weighted.then_some(&f.token_weights),
    };
    let mut weight_grad = None;
    let collector = LeafGrads::new([w.as_tensor()]);
    let (total, values) = match chunk {
        Some((c, mode)) => {
            let ht: Vec<HeadTerm> = terms.iter().map(|(t, w)| HeadTerm { term: *t, weight: *w }).collect();
            let l = collector.collecting(|| fused_loss(&ht, &ctx, c, mode)).expect("fused");
            assert_eq!(l.weight_grad.is_some(), mode == WeightGradient::Returned);
            weight_grad = l.weight_grad;
            if let WeightGradient::Collected { scale } = mode {
                // Collected times `scale`: what the backward of `scale * total` gives.
                let g = collector.take(w.as_tensor()).expect("collected dL/dW");
                weight_grad = Some((w.as_tensor().clone(), (g / scale).expect("unscaled")));
            }
            (l.total, l.values)
        }
        None => {
            let vals: Vec<Tensor> = terms.iter().map(|(t, _)| t.compute(&ctx).expect("compute")).collect();
            let mut total = (vals[0].clone() * terms[0].1).expect("w");
            for (v, (_, w)) in vals.iter().zip(terms).skip(1) {
                total = (total + (v * *w).expect("w")).expect("sum");
            }
            let values = vals.iter().map(scalar).collect();
            (total, values)
        }
    };
    let mut grads = total.backward().expect("backward");
    if let Some((w, g)) = weight_grad {
        assert!(grads.get(&w).is_none(), "dL/dW was returned and is in the graph too");
        grads.insert(&w, g);
    }
    let flat = |t: &Tensor| -> Vec<f64> {
        grads
            .get(t)
            .expect("gradient")
            .to_dtype(DType::F64)
            .and_then(|g| g.flatten_all())
            .and_then(|g| g.to_vec1())
            .expect("vec")
    };
    (scalar(&total), values, flat(h.as_tensor()), flat(w.as_tensor()))
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .and_then(|t| t.to_scalar::<f64>())
        .expect("scalar")
}

fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    assert!(scale > 1e-12, "{what}: all zero");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * scale, "{what}[{i}]: fused {x} vs unfused {y}");
    }
    assert_eq!(a.len(), b.len(), "{what}: lengths");
}

fn check(terms: &[(&dyn LossTerm, f64)], form: TeacherForm, label: &str) {
    for dtype in [DType::F64, DType::F32] {
        let f = fixture(dtype);
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for weighted in [true, false] {
            let (t0, v0, gh0, gw0) = run(terms, &f, form, weighted, None);
            let modes = [
                WeightGradient::InGraph,
                WeightGradient::Returned,
                WeightGradient::Collected { scale: 0.25 },
            ];
            for (chunk, mode) in [1, 3, 4, B * S, 64].into_iter().zip(modes.iter().cycle()) {
                let what = format!("{label} {form:?} {dtype:?} weighted={weighted} chunk={chunk} {mode:?}");
                let (t1, v1, gh1, gw1) = run(terms, &f, form, weighted, Some((chunk, *mode)));
                assert_close(&format!("{what} total"), &[t1], &[t0], tol);
                assert_close(&format!("{what} values"), &v1, &v0, tol);
                assert_close(&format!("{what} d/dhidden"), &gh1, &gh0, tol);
                assert_close(&format!("{what} d/dweight"), &gw1, &gw0, tol);
            }
        }
    }
}

fn dense_terms() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    vec![
        ("kl", json!({"temperature": 2.0})),
        ("kl", json!({"temperature": 1.5, "fused": false})),
        ("reverse_kl", json!({"temperature": 1.5})),
        ("jsd", json!({"beta": 0.3, "temperature": 2.0})),
        ("skew_kl", json!({"alpha": 0.2, "temperature": 2.0})),
        ("skew_kl", json!({"alpha": 0.4, "direction": "reverse"})),
        ("tvd", json!({"temperature": 1.0})),
        ("topk_kl", json!({"k": K, "tail": "renormalize", "temperature": 2.0})),
        ("topk_kl", json!({"k": K})),
        ("topk_kl", json!({"k": K, "union_student": true})),
        ("ce", json!({"label_smoothing": 0.1})),
        ("ce", json!({"fused": false})),
        ("sampled_reverse_kl", json!({})),
        ("sampled_reverse_kl", json!({"fused": false})),
    ]
}

#[test]
fn every_logit_term_matches_the_unfused_path() {
    for (kind, params) in dense_terms() {
        let t = term(kind, params.clone(), false);
        for form in [TeacherForm::Dense, TeacherForm::Head] {
            check(&[(t.as_ref(), 0.7)], form, &format!("{kind} {params}"));
        }
    }
}

#[test]
fn a_weighted_sum_of_terms_matches_the_unfused_path() {
    use serde_json::json;
    let kl = term("kl", json!({"temperature": 2.0}), false);
    let ce = term("ce", json!({}), false);
    let jsd = term("jsd", json!({"beta": 0.5}), false);
    let zero = term("tvd", json!({}), false);
    let terms: Vec<(&dyn LossTerm, f64)> = vec![
        (kl.as_ref(), 0.7),
        (ce.as_ref(), 0.3),
        (jsd.as_ref(), 1.5),
        (zero.as_ref(), 0.0),
    ];
    for form in [TeacherForm::Dense, TeacherForm::Head] {
        check(&terms, form, "kl + ce + jsd + 0 tvd");
    }
}

#[test]
fn a_teacher_with_only_its_top_k_matches_the_unfused_path() {
    use serde_json::json;
    // `kl` against a cached teacher is the top-k KL with the uniform tail.
    let kl = term("kl", json!({"temperature": 2.0}), true);
    let topk = term("topk_kl", json!({"k": K}), true);
    let ce = term("ce", json!({}), true);
    check(
        &[(kl.as_ref(), 0.5), (topk.as_ref(), 0.2), (ce.as_ref(), 0.3)],
        TeacherForm::Sparse,
        "sparse",
    );
}

/// A teacher handing its head in bf16 (a bf16 llama teacher on the CPU): the chunks multiply by
/// the packed weight, with the hidden rows rounded to bf16, which is the f32 path on the
/// rounded values up to the order of the sums.
#[test]
fn a_bf16_teacher_head_is_the_head_of_its_rounded_values() {
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("round")
    };
    let mut bf16 = fixture(DType::F32);
    bf16.teacher_weight = bf16.teacher_weight.to_dtype(DType::BF16).expect("bf16");
    let mut rounded = fixture(DType::F32);
    rounded.teacher_hidden = round(&rounded.teacher_hidden);
    rounded.teacher_weight = round(&rounded.teacher_weight);
    let kl = term("kl", serde_json::json!({"temperature": 2.0}), false);
    let terms = [(kl.as_ref(), 1.0)];
    let mode = Some((3, WeightGradient::InGraph));
    let got = run(&terms, &bf16, TeacherForm::Head, true, mode);
    let want = run(&terms, &rounded, TeacherForm::Head, true, mode);
    assert!(got.0 > 0.0);
    assert_close("value", &[got.0], &[want.0], 1e-5);
    assert_close("dL/dh", &got.2, &want.2, 1e-5);
    assert_close("dL/dW", &got.3, &want.3, 1e-5);
}

/// A bf16 student's head (`lm_head.bf16_products`): the chunks' `h W^T`, `G W` and `G^T h`
/// in bf16 products equal the unfused head in the bf16 linear layer (every gradient mode, several
/// chunk sizes), and differ from the f32 products by more than the tolerance.
#[test]
fn a_bf16_student_head_matches_the_bf16_linear_layer() {
    let mut f = fixture(DType::F32);
    f.student_bf16 = true;
    let kl = term("kl", serde_json::json!({"temperature": 2.0}), false);
    let ce = term("ce", serde_json::json!({}), false);
    let terms = [(kl.as_ref(), 0.7), (ce.as_ref(), 0.3)];
    let want = run(&terms, &f, TeacherForm::Head, true, None);
    let modes = [
        WeightGradient::InGraph,
        WeightGradient::Returned,
        WeightGradient::Collected { scale: 0.25 },
    ];
    for (chunk, mode) in [1, 3, B * S].into_iter().zip(modes) {
        let got = run(&terms, &f, TeacherForm::Head, true, Some((chunk, mode)));
        let what = format!("chunk {chunk} {mode:?}");
        assert_close(&format!("{what} value"), &[got.0], &[want.0], 1e-5);
        assert_close(&format!("{what} dL/dh"), &got.2, &want.2, 1e-5);
        assert_close(&format!("{what} dL/dW"), &got.3, &want.3, 1e-5);
    }
    f.student_bf16 = false;
    let f32 = run(&terms, &f, TeacherForm::Head, true, Some((3, WeightGradient::InGraph)));
    let scale = want.2.iter().fold(0f64, |m, x| m.max(x.abs()));
    let apart = want.2.iter().zip(&f32.2).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        apart > 1e-4 * scale,
        "the bf16 head's dL/dh is the f32 one's ({apart} of {scale})"
    );
}

#[test]
fn chunk_size_follows_the_vocabulary() {
    assert_eq!(chunk_tokens(100, 49_152), 100);
    assert_eq!(chunk_tokens(0, 49_152), 256);
    assert_eq!(chunk_tokens(0, 128_256), 256);
    assert_eq!(chunk_tokens(0, 262_144), 128);
    assert_eq!(chunk_tokens(0, 100_000_000), 16);
}

/// A term without a per-token form.
struct Whole;

impl LossTerm for Whole {
    fn compute(&self, ctx: &StepContext) -> retort_core::Result<Tensor> {
        Ok(ctx.student.logits.sum_all()?)
    }
    fn needs_teacher(&self) -> bool {
        false
    }
}

#[test]
fn a_term_without_a_per_token_form_is_refused() {
    let f = fixture(DType::F32);
    let mut student = Outputs::logits_only(Tensor::zeros((B, S, 0), DType::F32, &Device::Cpu).expect("z"));
    student.taps.insert(LM_HEAD_HIDDEN.into(), f.hidden.clone());
    student.taps.insert(LM_HEAD_WEIGHT.into(), f.weight.clone());
    let batch = Batch {
        input_ids: f.targets.clone(),
        targets: f.targets.clone(),
        mask: None,
        source: None,
    };
    let ctx = StepContext {
        batch: &batch,
        student: &student,
        teacher: None,
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let err = fused_loss(
        &[HeadTerm {
            term: &Whole,
            weight: 1.0,
        }],
        &ctx,
        4,
        WeightGradient::InGraph,
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("per-token form"), "{err}");
}

#[test]
fn the_rows_of_a_padded_head_get_their_gradient_through_the_graph() {
    let f = fixture(DType::F64);
    let pad = Tensor::ones((5, H), DType::F64, &Device::Cpu).expect("pad");
    let padded = Var::from_tensor(&Tensor::cat(&[&f.weight, &pad], 0).expect("cat")).expect("var");
    let h = Var::from_tensor(&f.hidden).expect("h");
    let ce = term("ce", serde_json::json!({}), false);
    let batch = Batch {
        input_ids: f.targets.clone(),
        targets: f.targets.clone(),
        mask: None,
        source: None,
    };
    // The head's first V rows, as a padded vocabulary is narrowed: not a variable's tensor.
    let rows = padded.as_tensor().narrow(0, 0, V).expect("rows");
    let grads = |fused: bool| -> Vec<f64> {
        let student = if fused {
            let mut o = Outputs::logits_only(Tensor::zeros((B, S, 0), DType::F64, &Device::Cpu).expect("z"));
            o.taps.insert(LM_HEAD_HIDDEN.into(), h.as_tensor().clone());
            o.taps.insert(LM_HEAD_WEIGHT.into(), rows.clone());
            o
        } else {
            Outputs::logits_only(h.as_tensor().broadcast_matmul(&rows.t().expect("t")).expect("z"))
        };
        let ctx = StepContext {
            batch: &batch,
            student: &student,
            teacher: None,
            progress: Progress::new(0, 1),
            token_weights: None,
        };
        let total = if fused {
            let l = fused_loss(
                &[HeadTerm {
                    term: ce.as_ref(),
                    weight: 1.0,
                }],
                &ctx,
                3,
                WeightGradient::Returned,
            )
            .expect("fused");
            assert!(l.weight_grad.is_none(), "a narrowed head's gradient stays in the graph");
            l.total
        } else {
            ce.compute(&ctx).expect("ce")
        };
        let g = total.backward().expect("backward");
        g.get(padded.as_tensor())
            .expect("the padded head's gradient")
            .flatten_all()
            .and_then(|g| g.to_vec1())
            .expect("vec")
    };
    let (fused, full) = (grads(true), grads(false));
    assert_close("padded head", &fused, &full, 1e-10);
    assert!(fused[V * H..].iter().all(|&x| x == 0.0), "padding rows get no gradient");
}
