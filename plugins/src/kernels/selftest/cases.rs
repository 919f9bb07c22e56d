//! The case list: every op of `kernels/` as a family of [`Op`]s (one per variant: divergence
//! kind and temperature, tail, smoothing, ...), each at its shapes and at the dtypes of the
//! device.
//!
//! An [`Op`] names its inputs and their [`Role`]s, its fused entry (the dispatching one the
//! models and losses call), its composite, and the reference: the composite, except for the
//! attention, whose composite calls the dispatching (fused where supported) softmax, so its
//! reference is composed of the softmax's composite here, and GELU, whose composite (candle's
//! `gelu`) has a backward with 6-digit constants, so its reference is composed of `tanh` and
//! products here.

use std::rc::Rc;

use candle_core::{DType, Device, Result, Tensor, Var, D};

use super::inputs::{class_ids, logits, normal, topk_union};
use super::SelftestOptions;
use crate::kernels::adamw::{self, AdamWStep};
use crate::kernels::divergence::{self, Divergence};
use crate::kernels::topk_divergence::{self, TopkTail};
use crate::kernels::{attention, bias, cross_entropy, gelu, layer_norm, rms_norm, rope, softmax, swiglu};

/// The divergences checked, each at every temperature of [`TEMPERATURES`]; a new kind is one
/// more entry.
const DIVERGENCES: &[Divergence] = &[
    Divergence::Forward,
    Divergence::Reverse,
    Divergence::Jsd(0.5),
    Divergence::SkewForward(0.1),
    Divergence::SkewReverse(0.1),
    Divergence::Tvd,
];

/// Temperatures of the divergences and of the renormalized top-k KL.
const TEMPERATURES: &[f64] = &[1.0, 2.0];

/// `[N, V]` of the large logit cases (a Llama-3 vocabulary, 8192 tokens).
const LARGE: &[usize] = &[8192, 128_256];

/// Teacher entries of the top-k cases (joined by `k / 2` more, see [`topk_union`]).
const TOPK: usize = 16;

/// What an input is to the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Cast to the dtype under test; its gradient is checked.
    Grad,
    /// Cast to the dtype under test; no gradient (teacher logits, masks, optimizer state).
    Const,
    /// Integer ids, taken as they are.
    Index,
}

/// One input of an op, on the host (f32 or u32).
pub struct Input {
    /// Its name in the report (`d{name}` for its gradient).
    pub name: &'static str,
    /// What it is to the check.
    pub role: Role,
    /// The values.
    pub host: Tensor,
}

impl Input {
    /// An input.
    pub fn new(name: &'static str, role: Role, host: Tensor) -> Self {
        Self { name, role, host }
    }
}

/// An op on its inputs (in the order of [`Op::inputs`]): its outputs.
pub type OpFn = Rc<dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>>;

/// Inputs of an op for one shape.
pub type InputsFn = Box<dyn Fn(&[usize]) -> Result<Vec<Input>>>;

/// One op variant under test.
pub struct Op {
    /// The family: the op's folder in `kernels/`.
    pub name: &'static str,
    /// The variant, e.g. `Forward T=2`.
    pub variant: String,
    /// Names of the outputs.
    pub outputs: &'static [&'static str],
    /// The inputs for a shape (seeded).
    pub inputs: InputsFn,
    /// Whether the fused path takes these (placed) inputs: the op's `supports`.
    pub supports: fn(&[Tensor]) -> bool,
    /// The dispatching entry.
    pub fused: OpFn,
    /// The composite (timed against the fused entry).
    pub composite: OpFn,
    /// What the f64 reference runs.
    pub reference: OpFn,
    /// One output value per row (token): the outputs' cotangents are per-row weights; else each
    /// row of the last dim shares one zero-or-not mask.
    pub per_token: bool,
    /// Every input and output splits along dim 0 into independent rows, so the reference may
    /// run in chunks of rows.
    pub rowwise: bool,
    /// Elements the fused forward and backward read and write, per element of the first input.
    pub traffic: f64,
    /// The shapes on every device.
    pub shapes: &'static [&'static [usize]],
    /// The shapes added off the CPU.
    pub device_shapes: &'static [&'static [usize]],
    /// Also at [`LARGE`] (off the CPU, or with `--large`), f32 and bf16.
    pub large: bool,
    /// Only on the CPU (a CPU kernel with no counterpart elsewhere).
    pub cpu_only: bool,
    /// Only these of the device's dtypes (empty: all of them).
    pub dtypes: &'static [DType],
}

/// An op at one shape and the dtypes to run it in (one set of inputs for all of them).
pub struct Group {
    /// The op.
    pub op: Rc<Op>,
    /// The shape its inputs are made for.
    pub dims: Vec<usize>,
    /// The dtypes under test.
    pub dtypes: Vec<DType>,
    /// Whether this is a [`LARGE`] case.
    pub large: bool,
}

/// The dtypes under test on `device`: the CPU kernels' f32 and f64; CUDA's f32, bf16, f16.
pub fn dtypes(device: &Device) -> Vec<DType> {
    if device.is_cpu() {
        vec![DType::F32, DType::F64]
    } else if device.is_cuda() {
        vec![DType::F32, DType::BF16, DType::F16]
    } else {
        vec![DType::F32]
    }
}

/// Every group to run on `device`, in order, ops filtered by `opts.filter`.
pub fn plan(device: &Device, opts: &SelftestOptions) -> Vec<Group> {
    let dtypes = dtypes(device);
    let on_device = !device.is_cpu();
    let mut groups = Vec::new();
    for op in all_ops().into_iter().filter(|op| opts.matches(op.name)) {
        if op.cpu_only && on_device {
            continue;
        }
        let op = Rc::new(op);
        let extra = if on_device { op.device_shapes } else { &[] };
        let op_dtypes: Vec<DType> = dtypes
            .iter()
            .copied()
            .filter(|d| op.dtypes.is_empty() || op.dtypes.contains(d))
            .collect();
        for dims in op.shapes.iter().chain(extra) {
            groups.push(Group {
                op: op.clone(),
                dims: dims.to_vec(),
                dtypes: op_dtypes.clone(),
                large: false,
            });
        }
        if op.large && (on_device || opts.large) {
            groups.push(Group {
                op: op.clone(),
                dims: LARGE.to_vec(),
                dtypes: dtypes
                    .iter()
                    .copied()
                    .filter(|d| matches!(d, DType::F32 | DType::BF16))
                    .collect(),
                large: true,
            });
        }
    }
    groups
}

/// The op families, in the order they run.
pub fn op_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for op in all_ops() {
        if !names.contains(&op.name) {
            names.push(op.name);
        }
    }
    names
}

/// Every op variant.
fn all_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    for &kind in DIVERGENCES {
        ops.extend(TEMPERATURES.iter().map(|&t| divergence(kind, t)));
    }
    ops.push(topk(TopkTail::Bucket, 1.0));
    ops.extend(TEMPERATURES.iter().map(|&t| topk(TopkTail::Renormalize, t)));
    ops.extend([0.0, 0.1].map(cross_entropy));
    ops.extend([
        softmax_last(),
        causal_softmax(),
        layer_norm(),
        rms_norm(),
        gelu(),
        swiglu(),
        rope(false),
        rope(true),
        bias(),
        attention(),
        attention_packed(),
        adamw(),
        adamw_group(),
        sum_squares(),
        linear(),
        linear_bf16(),
        super::head::lm_head_loss(),
    ]);
    ops
}

/// `x` as `N` inputs.
fn args<const N: usize>(x: &[Tensor]) -> Result<&[Tensor; N]> {
    x.try_into()
        .map_err(|_| candle_core::Error::Msg(format!("expected {N} inputs, got {}", x.len())))
}

/// An [`OpFn`] of one output.
fn one(f: impl Fn(&[Tensor]) -> Result<Tensor> + 'static) -> OpFn {
    Rc::new(move |x| Ok(vec![f(x)?]))
}

/// Shapes `[.., V]` of the logit ops.
const LOGIT_SHAPES: &[&[usize]] = &[&[32, 1000], &[2, 8, 1003]];
/// More logit shapes off the CPU.
const LOGIT_DEVICE_SHAPES: &[&[usize]] = &[&[2048, 32_000]];
/// Shapes `[.., D]` of the row ops (norms, activations, bias).
const ROW_SHAPES: &[&[usize]] = &[&[32, 256], &[3, 5, 100]];
/// More row shapes off the CPU.
const ROW_DEVICE_SHAPES: &[&[usize]] = &[&[8192, 4096]];
/// Attention shapes `[B, H, T, d]`.
const ATTENTION_SHAPES: &[&[usize]] = &[&[2, 2, 16, 8], &[1, 3, 33, 16]];
/// More attention shapes off the CPU: the tensor-core kernels' head-dim buckets with partial
/// tiles, rows copied 16 bytes at a time (`d` a multiple of 8) and not (`d = 36`).
/// `[2, 16, 2048, 64]`: the GPU check's TFLOP/s figure (scripts/gpu_run.sh).
const ATTENTION_DEVICE_SHAPES: &[&[usize]] = &[
    &[2, 4, 300, 128],
    &[1, 6, 200, 96],
    &[1, 4, 100, 36],
    &[4, 16, 1024, 64],
    &[2, 16, 2048, 64],
];

/// The defaults of an op of one output, the first input's shape the case's, row-wise.
pub fn op(
    name: &'static str,
    variant: String,
    inputs: InputsFn,
    supports: fn(&[Tensor]) -> bool,
    fused: OpFn,
    composite: OpFn,
) -> Op {
    Op {
        name,
        variant,
        outputs: &["y"],
        inputs,
        supports,
        fused,
        reference: composite.clone(),
        composite,
        per_token: false,
        rowwise: true,
        traffic: 5.0,
        shapes: ROW_SHAPES,
        device_shapes: ROW_DEVICE_SHAPES,
        large: false,
        cpu_only: false,
        dtypes: &[],
    }
}

/// `divergence::per_token` (student logits `[.., V]` against teacher logits): forward reads
/// both, backward reads both and writes the gradient.
fn divergence(kind: Divergence, t: f64) -> Op {
    let inputs: InputsFn = Box::new(|d| {
        Ok(vec![
            Input::new("student", Role::Grad, logits(d, 1)?),
            Input::new("teacher", Role::Const, logits(d, 2)?),
        ])
    });
    let supports = |x: &[Tensor]| args::<2>(x).is_ok_and(|[s, t]| divergence::supports(s, t));
    let fused = one(move |x| {
        let [s, te] = args::<2>(x)?;
        divergence::per_token(s, te, t, kind)
    });
    let composite = one(move |x| {
        let [s, te] = args::<2>(x)?;
        divergence::composite::per_token(s, &te.detach(), t, kind)
    });
    Op {
        outputs: &["D"],
        per_token: true,
        shapes: LOGIT_SHAPES,
        device_shapes: LOGIT_DEVICE_SHAPES,
        large: kind == Divergence::Forward && t == 1.0,
        ..op(
            "divergence",
            format!("{kind:?} T={t}"),
            inputs,
            supports,
            fused,
            composite,
        )
    }
}

/// `topk_divergence::per_token` on the teacher's top-k joined with the student's (duplicates
/// at `-inf`): bucket reads the row forward and backward and writes the gradient; renormalize
/// touches `k` entries and writes the gradient.
fn topk(tail: TopkTail, t: f64) -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let zs = logits(d, 1)?;
        let (ids, lpt) = topk_union(&zs, &logits(d, 2)?, TOPK)?;
        Ok(vec![
            Input::new("student", Role::Grad, zs),
            Input::new("ids", Role::Index, ids),
            Input::new("lpt", Role::Const, lpt),
        ])
    });
    let supports = |x: &[Tensor]| x.first().is_some_and(topk_divergence::supports);
    let fused = one(move |x| {
        let [s, ids, lpt] = args::<3>(x)?;
        topk_divergence::per_token(s, ids, lpt, tail, t)
    });
    let composite = one(move |x| {
        let [s, ids, lpt] = args::<3>(x)?;
        topk_divergence::composite::per_token(s, ids, lpt, tail, t)
    });
    Op {
        outputs: &["D"],
        per_token: true,
        traffic: if tail == TopkTail::Bucket { 3.0 } else { 1.0 },
        shapes: LOGIT_SHAPES,
        device_shapes: LOGIT_DEVICE_SHAPES,
        ..op(
            "topk_divergence",
            format!("{tail:?} T={t}"),
            inputs,
            supports,
            fused,
            composite,
        )
    }
}

/// `cross_entropy::per_token` smoothed by `eps`: forward reads the logits, backward reads them
/// and writes the gradient.
fn cross_entropy(eps: f64) -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let (lead, v) = d.split_at(d.len() - 1);
        Ok(vec![
            Input::new("logits", Role::Grad, logits(d, 1)?),
            Input::new("targets", Role::Index, class_ids(lead, v[0], 2)?),
        ])
    });
    let supports = |x: &[Tensor]| x.first().is_some_and(cross_entropy::supports);
    let fused = one(move |x| {
        let [z, y] = args::<2>(x)?;
        cross_entropy::per_token(z, y, eps)
    });
    let composite = one(move |x| {
        let [z, y] = args::<2>(x)?;
        cross_entropy::composite::per_token(z, y, eps)
    });
    Op {
        outputs: &["L"],
        per_token: true,
        traffic: 3.0,
        shapes: LOGIT_SHAPES,
        device_shapes: LOGIT_DEVICE_SHAPES,
        large: eps == 0.0,
        ..op(
            "cross_entropy",
            format!("eps={eps}"),
            inputs,
            supports,
            fused,
            composite,
        )
    }
}

/// Inputs `x ~ N(0, 2^2)` of an op of one input.
fn single_input(d: &[usize]) -> Result<Vec<Input>> {
    Ok(vec![Input::new("x", Role::Grad, logits(d, 1)?)])
}

/// `softmax::softmax_last`: forward reads `x`, writes `y`; backward reads `y`, `dy`, writes `dx`.
fn softmax_last() -> Op {
    let supports = |x: &[Tensor]| x.first().is_some_and(softmax::supports);
    let fused = one(|x| softmax::softmax_last(&args::<1>(x)?[0]));
    let composite = one(|x| softmax::composite::softmax_last(&args::<1>(x)?[0]));
    Op {
        shapes: &[&[32, 1000], &[4, 3, 77]],
        device_shapes: &[&[4096, 4096]],
        ..op(
            "softmax",
            "last dim".into(),
            Box::new(single_input),
            supports,
            fused,
            composite,
        )
    }
}

/// `softmax::causal_softmax` of scores `[B, H, T, T]` (the mask only read by the composite).
fn causal_softmax() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let t = d.last().copied().unwrap_or(1);
        Ok(vec![
            Input::new("scores", Role::Grad, logits(d, 1)?),
            Input::new("mask", Role::Const, softmax::causal_mask(t, DType::F32, &Device::Cpu)?),
        ])
    });
    let supports = |x: &[Tensor]| x.first().is_some_and(softmax::supports);
    let fused = one(|x| {
        let [s, m] = args::<2>(x)?;
        softmax::causal_softmax(s, m)
    });
    let composite = one(|x| {
        let [s, m] = args::<2>(x)?;
        softmax::composite::causal_softmax(s, m)
    });
    Op {
        rowwise: false,
        shapes: &[&[2, 2, 16, 16], &[1, 3, 7, 7]],
        device_shapes: &[&[4, 16, 512, 512]],
        ..op("softmax", "causal".into(), inputs, supports, fused, composite)
    }
}

/// Inputs `x ~ N(0.5, 2^2)`, `weight ~ N(1, 0.5^2)` `[D]` and, with `bias`, `bias ~ N(0, 1)`.
fn norm_inputs(d: &[usize], with_bias: bool) -> Result<Vec<Input>> {
    let width = &d[d.len().saturating_sub(1)..];
    let mut inputs = vec![
        Input::new("x", Role::Grad, normal(d, 0.5, 2.0, 1)?),
        Input::new("weight", Role::Grad, normal(width, 1.0, 0.5, 2)?),
    ];
    if with_bias {
        inputs.push(Input::new("bias", Role::Grad, normal(width, 0.0, 1.0, 3)?));
    }
    Ok(inputs)
}

/// LayerNorm's epsilon here.
const LN_EPS: f64 = 1e-5;
/// RMSNorm's epsilon here.
const RMS_EPS: f64 = 1e-6;

/// `layer_norm::layer_norm` (weight and bias gradients are sums over rows: not row-wise).
fn layer_norm() -> Op {
    let supports = |x: &[Tensor]| args::<3>(x).is_ok_and(|[x, w, b]| layer_norm::supports(x, w, b));
    let fused = one(|x| {
        let [x, w, b] = args::<3>(x)?;
        layer_norm::layer_norm(x, w, b, LN_EPS)
    });
    let composite = one(|x| {
        let [x, w, b] = args::<3>(x)?;
        layer_norm::composite::layer_norm(x, w, b, LN_EPS)
    });
    let inputs: InputsFn = Box::new(|d| norm_inputs(d, true));
    Op {
        rowwise: false,
        ..op(
            "layer_norm",
            format!("eps={LN_EPS}"),
            inputs,
            supports,
            fused,
            composite,
        )
    }
}

/// `rms_norm::rms_norm` (the weight's gradient is a sum over rows: not row-wise).
fn rms_norm() -> Op {
    let supports = |x: &[Tensor]| args::<2>(x).is_ok_and(|[x, w]| rms_norm::supports(x, w));
    let fused = one(|x| {
        let [x, w] = args::<2>(x)?;
        rms_norm::rms_norm(x, w, RMS_EPS)
    });
    let composite = one(|x| {
        let [x, w] = args::<2>(x)?;
        rms_norm::composite::rms_norm(x, w, RMS_EPS)
    });
    let inputs: InputsFn = Box::new(|d| norm_inputs(d, false));
    Op {
        rowwise: false,
        ..op("rms_norm", format!("eps={RMS_EPS}"), inputs, supports, fused, composite)
    }
}

/// GELU (tanh approximation) `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))` composed of
/// elementary candle ops: the reference, since candle's `gelu` (the composite) differentiates
/// with 6-digit constants (about 2e-7 relative).
fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let u = ((x + ((x.sqr()? * x)? * 0.044_715)?)? * c)?;
    (x * 0.5)? * (u.tanh()? + 1.0)?
}

/// `gelu::gelu` (tanh approximation).
fn gelu() -> Op {
    let supports = |x: &[Tensor]| x.first().is_some_and(gelu::supports);
    let fused = one(|x| gelu::gelu(&args::<1>(x)?[0]));
    let composite = one(|x| gelu::composite::gelu(&args::<1>(x)?[0]));
    Op {
        reference: one(|x| gelu_reference(&args::<1>(x)?[0])),
        ..op(
            "gelu",
            "tanh".into(),
            Box::new(single_input),
            supports,
            fused,
            composite,
        )
    }
}

/// `swiglu::swiglu`: forward reads `g`, `u`, writes `y`; backward reads `g`, `u`, `dy`, writes
/// `dg`, `du`.
fn swiglu() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        Ok(vec![
            Input::new("gate", Role::Grad, logits(d, 1)?),
            Input::new("up", Role::Grad, logits(d, 2)?),
        ])
    });
    let supports = |x: &[Tensor]| args::<2>(x).is_ok_and(|[g, u]| swiglu::supports(g, u));
    let fused = one(|x| {
        let [g, u] = args::<2>(x)?;
        swiglu::swiglu(g, u)
    });
    let composite = one(|x| {
        let [g, u] = args::<2>(x)?;
        swiglu::composite::swiglu(g, u)
    });
    Op {
        traffic: 8.0,
        ..op("swiglu", "silu(g) u".into(), inputs, supports, fused, composite)
    }
}

/// Inputs of RoPE for `x` `[B, H, T, d]`: `x ~ N(0, 1)` and the tables `cos`, `sin` `[T, d/2]`
/// of base 10000 for positions `3..3 + T` (an offset, as in cached decoding).
fn rope_inputs(d: &[usize]) -> Result<Vec<Input>> {
    let (t, head) = (d.get(2).copied().unwrap_or(1), d.last().copied().unwrap_or(2));
    let half = head / 2;
    let angles: Vec<f32> = (0..t * half)
        .map(|k| ((3 + k / half) as f64 * 10_000f64.powf(-((2 * (k % half)) as f64) / head as f64)) as f32)
        .collect();
    let angles = Tensor::from_vec(angles, (t, half), &Device::Cpu)?;
    Ok(vec![
        Input::new("x", Role::Grad, normal(d, 0.0, 1.0, 1)?),
        Input::new("cos", Role::Const, angles.cos()?),
        Input::new("sin", Role::Const, angles.sin()?),
    ])
}

/// `rope::rope` of `x` `[B, H, T, d]` (pairs half-split, or `interleaved`): forward reads `x`,
/// writes `y`; backward reads `dy`, writes `dx` (the tables are small and get no gradient).
fn rope(interleaved: bool) -> Op {
    let supports = |x: &[Tensor]| args::<3>(x).is_ok_and(|[x, c, s]| rope::supports(x, c, s));
    let fused = one(move |x| args::<3>(x).and_then(|[x, c, s]| rope::rope(x, c, s, interleaved)));
    let composite = one(move |x| args::<3>(x).and_then(|[x, c, s]| rope::composite::rope(x, c, s, interleaved)));
    let variant = if interleaved { "interleaved" } else { "half-split" };
    Op {
        rowwise: false,
        traffic: 4.0,
        shapes: ATTENTION_SHAPES,
        device_shapes: ATTENTION_DEVICE_SHAPES,
        ..op(
            "rope",
            variant.into(),
            Box::new(rope_inputs),
            supports,
            fused,
            composite,
        )
    }
}

/// `bias::add_bias`: forward reads `x`, writes `y`; backward sums `dy` over rows (`dx = dy`).
fn bias() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        Ok(vec![
            Input::new("x", Role::Grad, logits(d, 1)?),
            Input::new(
                "bias",
                Role::Grad,
                normal(&d[d.len().saturating_sub(1)..], 0.0, 1.0, 2)?,
            ),
        ])
    });
    let supports = |x: &[Tensor]| args::<2>(x).is_ok_and(|[x, b]| bias::supports(x, b));
    let fused = one(|x| {
        let [x, b] = args::<2>(x)?;
        bias::add_bias(x, b)
    });
    let composite = one(|x| {
        let [x, b] = args::<2>(x)?;
        bias::composite::add_bias(x, b)
    });
    Op {
        rowwise: false,
        traffic: 3.0,
        ..op("bias", "x + b".into(), inputs, supports, fused, composite)
    }
}

/// Shapes `[.., in]` of the linear layer's input.
const LINEAR_SHAPES: &[&[usize]] = &[&[64, 96], &[3, 37, 45]];
/// Output features of the linear cases (not a multiple of the tile blocks).
const LINEAR_OUT: usize = 40;

/// `x [.., in]`, `w [LINEAR_OUT, in]` (scaled by `1 / sqrt(in)`) and `b [LINEAR_OUT]`.
fn linear_inputs(d: &[usize]) -> Result<Vec<Input>> {
    let inp = d.last().copied().unwrap_or(1);
    Ok(vec![
        Input::new("x", Role::Grad, normal(d, 0.0, 1.0, 1)?),
        Input::new(
            "w",
            Role::Grad,
            normal(&[LINEAR_OUT, inp], 0.0, 1.0 / (inp as f32).sqrt(), 2)?,
        ),
        Input::new("b", Role::Grad, normal(&[LINEAR_OUT], 0.0, 1.0, 3)?),
    ])
}

/// The linear layer of the kernels in `cpu/linear` (CPU only: elsewhere models compose
/// `matmul` and the bias op, which the cases above and cuBLAS cover).
fn linear_op(variant: &str, supports: fn(&[Tensor]) -> bool, fused: OpFn, composite: OpFn) -> Op {
    Op {
        rowwise: false,
        traffic: 4.0,
        shapes: LINEAR_SHAPES,
        device_shapes: &[],
        cpu_only: true,
        ..op(
            "linear",
            variant.into(),
            Box::new(linear_inputs),
            supports,
            fused,
            composite,
        )
    }
}

/// `kernels::cpu::linear::linear_t`, the fused CPU layer the models' `nn::linear_out_in`
/// dispatches to where it runs.
fn linear() -> Op {
    let supports =
        |x: &[Tensor]| args::<3>(x).is_ok_and(|[x, w, b]| crate::kernels::cpu::linear::supports(x, w, Some(b)));
    let fused = one(|x| {
        let [x, w, b] = args::<3>(x)?;
        crate::kernels::cpu::linear::linear_t(x, w, Some(b))
    });
    let composite = one(|x| {
        let [x, w, b] = args::<3>(x)?;
        x.broadcast_matmul(&w.t()?)?.broadcast_add(b)
    });
    linear_op("x W^T + b", supports, fused, composite)
}

/// `kernels::cpu::linear::linear_t_bf16` (CPU f32): against the products of the rounded
/// factors in f64 (`selftest::rounding`).
fn linear_bf16() -> Op {
    let supports = |x: &[Tensor]| x.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    let fused = one(|x| {
        let [x, w, b] = args::<3>(x)?;
        crate::kernels::cpu::linear::linear_t_bf16(x, w, Some(b))
    });
    let composite = one(|x| {
        use super::rounding::{round_gradient, round_values};
        let [x, w, b] = args::<3>(x)?;
        let y = round_values(x)?.broadcast_matmul(&round_values(w)?.t()?)?;
        round_gradient(&y)?.broadcast_add(b)
    });
    Op {
        dtypes: &[DType::F32],
        ..linear_op("bf16 products", supports, fused, composite)
    }
}

/// `1 / sqrt(d)` of attention inputs `[B, H, T, d]`.
fn attention_scale(dims: &[usize]) -> f64 {
    1.0 / (dims.last().copied().unwrap_or(1).max(1) as f64).sqrt()
}

/// Causal attention of `q`, `k`, `v` `[B, H, T, d]` composed of the softmax's composite (no
/// dispatching op inside): the attention's reference.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let scores = (q * attention_scale(q.dims()))?.matmul(&k.t()?)?;
    let p = softmax::composite::causal_softmax(&scores, mask)?;
    p.matmul(v)?.transpose(1, 2)?.reshape((b, t, h * d))
}

/// The causal mask `[T, T]` of attention inputs `[B, H, T, d]`.
fn attention_mask(d: &[usize]) -> Result<Input> {
    let t = d.get(2).copied().unwrap_or(1);
    Ok(Input::new(
        "mask",
        Role::Const,
        softmax::causal_mask(t, DType::F32, &Device::Cpu)?,
    ))
}

/// `attention::causal_attention` of `q`, `k`, `v` `[B, H, T, d]`: forward reads `q`, `k`, `v`,
/// writes `y`; backward reads those and `dy`, writes `dq`, `dk`, `dv`.
fn attention() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        Ok(vec![
            Input::new("q", Role::Grad, normal(d, 0.0, 1.0, 1)?),
            Input::new("k", Role::Grad, normal(d, 0.0, 1.0, 2)?),
            Input::new("v", Role::Grad, normal(d, 0.0, 1.0, 3)?),
            attention_mask(d)?,
        ])
    });
    let supports = |x: &[Tensor]| args::<4>(x).is_ok_and(|[q, k, v, _]| attention::supports(q, k, v));
    let fused = one(|x| {
        let [q, k, v, m] = args::<4>(x)?;
        attention::causal_attention(q, k, v, attention_scale(q.dims()), m)
    });
    let composite = one(|x| {
        let [q, k, v, m] = args::<4>(x)?;
        attention::composite::causal_attention(q, k, v, attention_scale(q.dims()), m)
    });
    Op {
        reference: one(|x| {
            let [q, k, v, m] = args::<4>(x)?;
            attention_reference(q, k, v, m)
        }),
        rowwise: false,
        traffic: 12.0,
        shapes: ATTENTION_SHAPES,
        device_shapes: ATTENTION_DEVICE_SHAPES,
        ..op("attention", "q, k, v".into(), inputs, supports, fused, composite)
    }
}

/// `(q, k, v)` `[B, H, T, d]` of a packed projection `qkv` `[B, T, 3 H d]` of `heads` heads.
fn split_qkv(qkv: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
    let (b, t, w) = qkv.dims3()?;
    let d = w / (3 * heads).max(1);
    let part = |i: usize| -> Result<Tensor> {
        qkv.narrow(D::Minus1, i * heads * d, heads * d)?
            .reshape((b, t, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// `attention::causal_attention_packed` of a projection `qkv` `[B, T, 3 H d]` (the
/// transformer's path), held as `[B, T, 3, H, d]` so that the op sees the head count; the case
/// shape is `[B, H, T, d]`.
fn attention_packed() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let [b, h, t, w] = <[usize; 4]>::try_from(d)
            .map_err(|_| candle_core::Error::Msg(format!("attention shape {d:?} is not [B, H, T, d]")))?;
        Ok(vec![
            Input::new("qkv", Role::Grad, normal(&[b, t, 3, h, w], 0.0, 1.0, 1)?),
            attention_mask(d)?,
        ])
    });
    // `(qkv [B, T, 3 H d], H, 1 / sqrt(d), mask)`.
    let unpack = |x: &[Tensor]| -> Result<(Tensor, usize, f64, Tensor)> {
        let [qkv, m] = args::<2>(x)?;
        let (b, t, three, h, d) = qkv.dims5()?;
        Ok((
            qkv.reshape((b, t, three * h * d))?,
            h,
            1.0 / (d as f64).sqrt(),
            m.clone(),
        ))
    };
    let supports = |x: &[Tensor]| x.first().is_some_and(|qkv| attention::supports(qkv, qkv, qkv));
    let fused = one(move |x| {
        let (qkv, h, scale, m) = unpack(x)?;
        attention::causal_attention_packed(&qkv, h, h, scale, &m)
    });
    let composite = one(move |x| {
        let (qkv, h, scale, m) = unpack(x)?;
        attention::composite::causal_attention_packed(&qkv, h, h, scale, &m)
    });
    let reference = one(move |x| {
        let (qkv, h, _, m) = unpack(x)?;
        let [q, k, v] = split_qkv(&qkv, h)?;
        attention_reference(&q, &k, &v, &m)
    });
    Op {
        reference,
        rowwise: false,
        traffic: 4.0,
        shapes: ATTENTION_SHAPES,
        device_shapes: ATTENTION_DEVICE_SHAPES,
        ..op("attention", "packed qkv".into(), inputs, supports, fused, composite)
    }
}

/// The AdamW step checked: step 10, clipping by half, a learning rate large enough that the
/// update is a visible part of `w'`.
const ADAMW_STEP: AdamWStep = AdamWStep {
    beta1: 0.9,
    beta2: 0.999,
    bias_correction1: 0.651_321_559_9,
    bias_correction2: 0.009_955_119_790_251_3,
    eps: 1e-8,
    lr: 0.1,
    weight_decay: 0.1,
    grad_scale: 0.5,
};

/// An AdamW update: `(w, g, m, v, step) -> (w', m', v')`.
type AdamWUpdate = fn(&Tensor, &Tensor, &Tensor, &Tensor, AdamWStep) -> Result<(Tensor, Tensor, Tensor)>;

/// `adamw::adamw_update` (values only: an optimizer step is not differentiated): reads `w`,
/// `g`, `m`, `v`, writes `w'`, `m'`, `v'`.
fn adamw() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        Ok(vec![
            Input::new("w", Role::Const, normal(d, 0.0, 1.0, 1)?),
            Input::new("g", Role::Const, normal(d, 0.0, 1.0, 2)?),
            Input::new("m", Role::Const, normal(d, 0.0, 0.1, 3)?),
            Input::new("v", Role::Const, normal(d, 0.0, 0.1, 4)?.sqr()?),
        ])
    });
    let supports = |x: &[Tensor]| args::<4>(x).is_ok_and(|[w, g, m, v]| adamw::supports(w, g, m, v));
    let update = |f: AdamWUpdate| -> OpFn {
        Rc::new(move |x| {
            let [w, g, m, v] = args::<4>(x)?;
            let (w, m, v) = f(w, g, m, v, ADAMW_STEP)?;
            Ok(vec![w, m, v])
        })
    };
    Op {
        outputs: &["w'", "m'", "v'"],
        traffic: 7.0,
        shapes: &[&[10_000], &[100, 37]],
        device_shapes: &[&[1 << 24]],
        ..op(
            "adamw",
            "step 10".into(),
            inputs,
            supports,
            update(adamw::adamw_update),
            update(adamw::composite::update),
        )
    }
}

/// The shapes of a group of three tensors for a case of shape `d`: `d`, 7 elements, and a
/// third of `d`'s elements plus one (so the group's tensors differ in size and alignment).
fn group_shapes(d: &[usize]) -> [Vec<usize>; 3] {
    let n: usize = d.iter().product();
    [d.to_vec(), vec![7], vec![n / 3 + 1]]
}

/// `adamw::adamw_group_step` over three parameters of different sizes (one kernel launch on a
/// GPU): `w`, `m`, `v` of each after the step, against the composed update of each.
fn adamw_group() -> Op {
    const NAMES: [&str; 12] = ["w1", "g1", "m1", "v1", "w2", "g2", "m2", "v2", "w3", "g3", "m3", "v3"];
    let inputs: InputsFn = Box::new(|d| {
        let mut x = Vec::with_capacity(12);
        for (i, dims) in group_shapes(d).iter().enumerate() {
            let seed = 10 * i as u64;
            x.push(normal(dims, 0.0, 1.0, seed + 1)?);
            x.push(normal(dims, 0.0, 1.0, seed + 2)?);
            x.push(normal(dims, 0.0, 0.1, seed + 3)?);
            x.push(normal(dims, 0.0, 0.1, seed + 4)?.sqr()?);
        }
        Ok(NAMES
            .iter()
            .zip(x)
            .map(|(&n, t)| Input::new(n, Role::Const, t))
            .collect())
    });
    let supports = |x: &[Tensor]| {
        x.chunks(4)
            .all(|q| matches!(q, [w, g, m, v] if adamw::supports(w, g, m, v)))
    };
    let fused: OpFn = Rc::new(|x| {
        let mut state = x
            .chunks(4)
            .map(|q| Ok((Var::from_tensor(&q[0].copy()?)?, q[2].copy()?, q[3].copy()?)))
            .collect::<Result<Vec<_>>>()?;
        let mut slots: Vec<adamw::AdamWSlot<'_>> = state
            .iter_mut()
            .zip(x.chunks(4))
            .map(|((w, m, v), q)| adamw::AdamWSlot { w: &*w, g: &q[1], m, v })
            .collect();
        adamw::adamw_group_step(&mut slots, ADAMW_STEP)?;
        Ok(state.into_iter().flat_map(|(w, m, v)| [w.into_inner(), m, v]).collect())
    });
    let composite: OpFn = Rc::new(|x| {
        let mut out = Vec::with_capacity(9);
        for q in x.chunks(4) {
            let (w, m, v) = adamw::composite::update(&q[0], &q[1], &q[2], &q[3], ADAMW_STEP)?;
            out.extend([w, m, v]);
        }
        Ok(out)
    });
    Op {
        outputs: &["w1'", "m1'", "v1'", "w2'", "m2'", "v2'", "w3'", "m3'", "v3'"],
        rowwise: false,
        traffic: 7.0 * 4.0 / 3.0,
        shapes: &[&[10_000], &[100, 37]],
        device_shapes: &[&[1 << 24]],
        ..op("adamw", "group of 3".into(), inputs, supports, fused, composite)
    }
}

/// `adamw::sum_squares` (the gradient-norm reduction) of three tensors of different sizes: one
/// sum per tensor, in f64.
fn sum_squares() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let shapes = group_shapes(d);
        Ok(vec![
            Input::new("x1", Role::Const, normal(&shapes[0], 0.0, 1.0, 1)?),
            Input::new("x2", Role::Const, normal(&shapes[1], 0.0, 1.0, 2)?),
            Input::new("x3", Role::Const, normal(&shapes[2], 0.0, 1.0, 3)?),
        ])
    });
    let supports = adamw::sum_squares_supports;
    let sums = |f: fn(&[Tensor]) -> Result<Vec<f64>>| -> OpFn {
        Rc::new(move |x| {
            let s = f(x)?;
            Ok(vec![Tensor::from_vec(s, x.len(), &Device::Cpu)?])
        })
    };
    Op {
        outputs: &["sums"],
        rowwise: false,
        traffic: 4.0 / 3.0,
        shapes: &[&[10_000], &[100, 37]],
        device_shapes: &[&[1 << 24]],
        ..op(
            "adamw",
            "sum of squares".into(),
            inputs,
            supports,
            sums(adamw::sum_squares),
            sums(adamw::composite::sum_squares),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_adamw_bias_corrections_are_those_of_step_10() {
        let s = ADAMW_STEP;
        assert!((s.bias_correction1 - (1.0 - s.beta1.powi(10))).abs() < 1e-10);
        assert!((s.bias_correction2 - (1.0 - s.beta2.powi(10))).abs() < 1e-15);
    }

    /// Every op folder of `kernels/` (not `cpu/` and `cuda/`, the code of one device,
    /// `emulated/`, the CUDA kernels' CPU emulation for tests, nor this one) is a family.
    #[test]
    fn every_op_folder_is_a_family() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join("kernels");
        let mut folders: Vec<String> = std::fs::read_dir(&root)
            .expect("kernels dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_dir())
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .filter(|n| !["cpu", "cuda", "emulated", "selftest"].contains(&n.as_str()))
            .collect();
        // The CPU-only fused linear layer (`kernels/cpu/linear`) is a family too.
        assert!(root.join("cpu").join("linear").is_dir());
        folders.push("linear".into());
        folders.sort();
        let mut names = op_names();
        names.sort();
        assert!(folders.len() >= 11, "{folders:?}");
        assert_eq!(folders, names);
    }

    #[test]
    fn the_cpu_plan_runs_f32_and_f64_and_the_large_cases_only_when_asked() {
        let plain = plan(&Device::Cpu, &SelftestOptions::default());
        assert!(plain.iter().all(|g| !g.large));
        assert!(plain
            .iter()
            .all(|g| g.dtypes == [DType::F32, DType::F64] || g.op.variant == "bf16 products"));
        assert!(plain
            .iter()
            .any(|g| g.op.variant == "bf16 products" && g.dtypes == [DType::F32]));
        let large = plan(
            &Device::Cpu,
            &SelftestOptions {
                large: true,
                ..Default::default()
            },
        );
        let big: Vec<&Group> = large.iter().filter(|g| g.large).collect();
        assert_eq!(big.len(), 2);
        assert!(big.iter().all(|g| g.dims == LARGE && g.dtypes == [DType::F32]));
        let names: Vec<&str> = big.iter().map(|g| g.op.name).collect();
        assert_eq!(names, ["divergence", "cross_entropy"]);
    }

    #[test]
    fn a_filter_keeps_the_ops_whose_name_contains_it() {
        let opts = SelftestOptions {
            filter: Some("divergence".into()),
            ..Default::default()
        };
        let groups = plan(&Device::Cpu, &opts);
        assert!(!groups.is_empty());
        assert!(groups.iter().all(|g| g.op.name.contains("divergence")));
        assert!(groups.iter().any(|g| g.op.name == "topk_divergence"));
    }

    #[test]
    fn every_input_builder_makes_inputs_for_every_shape() {
        for group in plan(&Device::Cpu, &SelftestOptions::default()) {
            let inputs = (group.op.inputs)(&group.dims).expect("inputs");
            let first = inputs.first().expect("an input");
            assert_eq!(first.host.dims()[0], group.dims[0], "{}", group.op.variant);
            if group.op.rowwise {
                assert!(inputs.iter().all(|i| i.host.dims()[0] == group.dims[0]));
            }
        }
    }
}
