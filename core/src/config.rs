//! The serde-facing run configuration. Loading (file + `RETORT_*` env + `--set`) is the
//! host's job; these types only say what a config may hold and what the defaults are.
//!
//! Every section is `deny_unknown_fields`: a typo is an error naming the key path and the
//! accepted keys. Components are `{ kind = "...", ...params }`; a component's params are
//! checked by the plugin that owns the kind.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Params, ScalarSpec};

/// A whole run: data, teacher, student, objective, training and evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Name, seed and device.
    pub run: RunSection,
    /// Data source component. Default: `{ kind = "synthetic" }`.
    pub data: ComponentSpec,
    /// Teacher component, and how to pretrain it when it has no checkpoint.
    pub teacher: TeacherSpec,
    /// Student component. Default: `{ kind = "transformer", n_layer = 2, n_embd = 64, n_head = 4 }`.
    pub student: ComponentSpec,
    /// Loss terms; `total = sum_i weight_i * term_i`.
    /// Default: `[{ kind = "kl", weight = 0.5, temperature = 2.0 }, { kind = "ce", weight = 0.5 }]`.
    pub loss: Vec<LossSpec>,
    /// Router that weights the terms each step. Default: `{ kind = "static" }`.
    pub router: ComponentSpec,
    /// Optimisation of the student (and, by default, of a pretrained teacher).
    pub train: TrainSection,
    /// Evaluation and the scratch baseline.
    pub eval: EvalSection,
    /// Metric observers. Default: `[{ kind = "jsonl" }]` (writes `metrics.jsonl`).
    pub observers: Vec<ComponentSpec>,
    /// Plugin libraries to load before anything is built.
    pub plugins: PluginsSection,
    /// Stages of the student's training, run in order; each overrides parts of `[train]` and
    /// the loss weights. Default: none (one stage of `train.steps` with `[train]` as it is).
    pub stages: Vec<StageSpec>,
    /// Distillation on sampled sequences (`[on_policy]`). Default: none (every step trains on
    /// the data's windows).
    pub on_policy: Option<OnPolicySection>,
    /// Data-parallel training across processes (`[parallel]`): the collective backend, the
    /// gradient buckets and the cross-rank parameter check. Used only when a launcher started
    /// several ranks (`mpirun`, `srun`, torchrun-style variables); see docs/scaling.md.
    pub parallel: ParallelSection,
}

/// One `[[stages]]` entry: a stretch of the student's training with its own budget,
/// parameter groups, learning rate and loss weights. The optimizer and every schedule are
/// rebuilt at the start of a stage (schedules see progress 0 -> 1 within the stage); the
/// model, the loss terms' own parameters (projections), the router and the EMA carry over.
///
/// ```toml
/// [[stages]]
/// name = "projections"
/// steps = 100
/// param_groups = [{ pattern = "loss\\..*", lr_mult = 1.0 }, { pattern = ".*", lr_mult = 0.0 }]
/// loss_weights = { ce = 0.0 }
///
/// [[stages]]
/// name = "all"
/// steps = 300
/// lr = 1e-3
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Name in metrics and reports. Default `stage<N>` (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Optimizer steps of the stage (>= 1).
    pub steps: usize,
    /// Peak learning rate (number or schedule). Default: `train.lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<ScalarSpec>,
    /// Factor on `lr` over the stage. Default: `train.lr_schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_schedule: Option<ComponentSpec>,
    /// Parameter groups of the stage (replace `train.param_groups`). Default: `train.param_groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param_groups: Option<Vec<ParamGroupSpec>>,
    /// Default: `train.weight_decay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Default: `train.grad_clip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Default: `train.grad_accum`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// Loss weights by term name (number or schedule); terms not named keep their `weight`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub loss_weights: std::collections::BTreeMap<String, ScalarSpec>,
    /// Fraction of the stage's steps on samples, in `[0, 1]` (needs `[on_policy]`), e.g. an
    /// off-policy stage (0) before an on-policy one. Default: `on_policy.lambda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_policy_lambda: Option<f64>,
}

impl StageSpec {
    /// The stage's name, `stage<index+1>` by default.
    pub fn name_or_default(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("stage{}", index + 1))
    }
}

/// `train.early_stopping`: stop a phase when the chosen evaluation metric has not improved by
/// more than `min_delta` for `patience` evaluations in a row (evaluations happen every
/// `train.eval_every` steps, which must then be > 0). The best weights are kept in
/// `checkpoints/<phase>/best/` and are the ones exported. Applies to the student and the
/// baseline, not to teacher pretraining.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingSpec {
    /// Metric to watch. Default `val_loss`.
    #[serde(default)]
    pub metric: EarlyStoppingMetric,
    /// Evaluations without improvement before stopping (>= 1). Default 3.
    #[serde(default = "three")]
    pub patience: usize,
    /// Smallest change that counts as an improvement (>= 0). Default 0.
    #[serde(default)]
    pub min_delta: f64,
}

fn three() -> usize {
    3
}

/// What early stopping watches.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EarlyStoppingMetric {
    /// Validation cross-entropy (lower is better).
    #[default]
    ValLoss,
    /// Mean KL(teacher || model) on the validation windows (lower is better).
    KlToTeacher,
    /// Top-1 agreement with the teacher (higher is better).
    Top1Agreement,
}

impl EarlyStoppingMetric {
    /// Metric name as in reports.
    pub fn name(self) -> &'static str {
        match self {
            EarlyStoppingMetric::ValLoss => "val_loss",
            EarlyStoppingMetric::KlToTeacher => "kl_to_teacher",
            EarlyStoppingMetric::Top1Agreement => "top1_agreement",
        }
    }

    /// Whether larger values are better.
    pub fn higher_is_better(self) -> bool {
        matches!(self, EarlyStoppingMetric::Top1Agreement)
    }
}

/// `[plugins]`: dynamic plugin libraries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    /// Library files built with `retort_sdk::export_plugin!` (relative to the working directory).
    pub paths: Vec<std::path::PathBuf>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            run: RunSection::default(),
            data: ComponentSpec::new("synthetic"),
            teacher: TeacherSpec {
                kind: "transformer".into(),
                pretrain: None,
                precision: None,
                params: obj(&[("n_layer", 4.into()), ("n_embd", 128.into()), ("n_head", 4.into())]),
            },
            student: ComponentSpec {
                kind: "transformer".into(),
                params: obj(&[("n_layer", 2.into()), ("n_embd", 64.into()), ("n_head", 4.into())]),
            },
            loss: vec![
                LossSpec {
                    kind: "kl".into(),
                    weight: 0.5.into(),
                    name: None,
                    params: obj(&[("temperature", 2.0.into())]),
                },
                LossSpec {
                    kind: "ce".into(),
                    weight: 0.5.into(),
                    name: None,
                    params: Map::new(),
                },
            ],
            router: ComponentSpec::new("static"),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            observers: vec![ComponentSpec::new("jsonl")],
            plugins: PluginsSection::default(),
            stages: Vec::new(),
            on_policy: None,
            parallel: ParallelSection::default(),
        }
    }
}

fn obj(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

/// `[run]`: identity of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// Run name; the run directory defaults to `runs/<name>`. Default `"quickstart"`.
    pub name: String,
    /// Seed of every random choice (init, batches, synthetic data). Default 1234.
    pub seed: u64,
    /// Device: `"cpu"`, `"cuda"`, `"cuda:N"` or `"metal"`. Default `"cpu"`.
    pub device: String,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            name: "quickstart".into(),
            seed: 1234,
            device: "cpu".into(),
        }
    }
}

/// A plugin component: `{ kind = "...", ...params }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ComponentSpec {
    /// Registered kind.
    pub kind: String,
    /// Everything else: the plugin's parameters.
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

impl ComponentSpec {
    /// A component of `kind` with no params.
    pub fn new(kind: &str) -> Self {
        ComponentSpec {
            kind: kind.into(),
            params: Map::new(),
        }
    }

    /// Its params, located at key path `path`.
    pub fn params_at(&self, path: &str) -> Params {
        Params::new(path, self.params.clone())
    }
}

/// `[teacher]`: a teacher component plus how to pretrain it when it has no checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TeacherSpec {
    /// Registered teacher kind.
    pub kind: String,
    /// Budget for training the teacher first, for kinds that are also students, when the
    /// params name no `checkpoint`. Default (absent): `train.steps * 2` steps at `train.lr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<PretrainSection>,
    /// Precision the frozen teacher computes in: `f32`, `bf16` or `f16` (passed to the kind
    /// as its `dtype` param when the teacher is loaded; pretraining always uses f32). A `llama`
    /// teacher in bf16 on the CPU keeps f32 activations and multiplies its projections in bf16
    /// (on the AMX tiles where the CPU has them). Default (absent): the kind's own default, f32
    /// for the built-ins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
    /// The kind's parameters (e.g. `checkpoint = "runs/x/teacher"` or model sizes).
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

/// Compute precision of a frozen teacher.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// bfloat16: f32's range, 8 bits of mantissa.
    Bf16,
    /// IEEE half: 11 bits of mantissa, range up to 65504.
    F16,
}

impl Precision {
    /// The name the kinds' `dtype` param takes.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// `[teacher.pretrain]`: budget of the teacher's own training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PretrainSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (a number or a schedule). Default: `train.lr`.
    #[serde(default)]
    pub lr: Option<ScalarSpec>,
}

/// One loss term: `{ kind = "kl", weight = 0.5, temperature = 2.0 }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossSpec {
    /// Registered loss kind.
    pub kind: String,
    /// Weight of the term in `total = sum_i weight_i * term_i`: a number or a schedule, >= 0
    /// over all of training unless the term declares signed weights. Default 1.0.
    #[serde(default = "one")]
    pub weight: ScalarSpec,
    /// Name in metrics and in `[[stages]] loss_weights`, unique among the terms (default: the
    /// kind, suffixed with its index if repeated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The kind's parameters.
    #[serde(flatten)]
    pub params: Map<String, Value>,
}

fn one() -> ScalarSpec {
    ScalarSpec::Number(1.0)
}

impl LossSpec {
    /// Its params, located at key path `path`.
    pub fn params_at(&self, path: &str) -> Params {
        Params::new(path, self.params.clone())
    }
}

/// `[on_policy]`: the student learns from sequences sampled during training, scored token by
/// token by the teacher: generalized KD (GKD, Agarwal et al. 2024: a fraction `lambda` of the
/// steps on the student's own samples), on-policy reverse KL (the `sampled_reverse_kl` term at
/// `lambda = 1`), or sequence-level KD (Kim & Rush 2016, `seq_kd`: on the teacher's samples).
///
/// On an on-policy step every training window keeps its first `prompt_tokens` tokens as the
/// prompt; the sampler continues each prompt by up to `max_new_tokens` tokens (stopping at the
/// tokenizer's end-of-sequence token); the teacher scores the sampled windows in one forward
/// pass and the configured terms apply to the sampled tokens only (prompt, padding and tokens
/// after the end of sequence are masked out). Which steps are on-policy, and every sample, is
/// fixed by the run seed and the step, so a resumed run samples what an uninterrupted one does.
///
/// ```toml
/// [on_policy]
/// lambda = 0.5
/// prompt_tokens = 16
/// temperature = 1.0
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicySection {
    /// Fraction of the student's optimizer steps trained on sampled sequences, in `[0, 1]`:
    /// step `s` (counted from 0) is on-policy when `floor((s + 1) * lambda) > floor(s * lambda)`,
    /// so the on-policy steps are spread evenly. 0 trains exactly as without `[on_policy]`.
    /// Default 0.5.
    pub lambda: f64,
    /// Tokens at the start of each training window kept as the prompt, in
    /// `[1, train.seq_len]`. Default: `train.seq_len / 2`.
    pub prompt_tokens: Option<usize>,
    /// Tokens sampled after each prompt at most, in `[1, train.seq_len + 1 - prompt_tokens]`
    /// (a sampled window is `prompt_tokens + max_new_tokens - 1` tokens long). Default: the
    /// largest.
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy. Default 1.0 (the estimators of on-policy
    /// divergences assume samples from the model's own distribution: temperature 1, no
    /// top-p or top-k).
    pub temperature: f64,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to `top_p`, in
    /// `(0, 1]`. Default 1.0.
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only; 0 is no limit. Default 0.
    pub top_k: usize,
    /// Sample from the teacher instead of the student: sequence-level KD (Kim & Rush 2016).
    /// Default false.
    pub seq_kd: bool,
    /// Stop a sample at the tokenizer's end-of-sequence token (when it has one). Default true.
    pub stop_at_eos: bool,
    /// Also train the student off-policy (`lambda = 0`: same init, same batches, same budget,
    /// phase `offpolicy`) and compare the two in the report. Default true.
    pub compare_off_policy: bool,
}

impl Default for OnPolicySection {
    fn default() -> Self {
        OnPolicySection {
            lambda: 0.5,
            prompt_tokens: None,
            max_new_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seq_kd: false,
            stop_at_eos: true,
            compare_off_policy: true,
        }
    }
}

/// `[parallel]`: data-parallel training. Each of the `W` ranks a launcher started reads its
/// `train.batch_size / W` windows of every global batch (the windows a single process would
/// read, in the same order), and the gradients are averaged across ranks before every AdamW
/// step, so the ranks apply identical updates. Ignored by a single process.
///
/// ```toml
/// [parallel]
/// backend = "mpi"
/// bucket_mb = 25
/// check_every = 50
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    /// Collective backend: `"auto"` (MPI when launched by `mpirun`/`srun`, NCCL for torchrun-
    /// style variables), `"mpi"`, `"nccl"`, or `"none"` (refuse a multi-rank launch). Default
    /// `"auto"`.
    pub backend: ParallelBackend,
    /// Gradients are averaged in buckets of about this many MiB (one collective call per
    /// bucket), at least 1. Default 25.
    pub bucket_mb: usize,
    /// Compare a checksum of every rank's parameters every this many steps; a rank whose
    /// parameters differ from rank 0's stops the run. 0 turns the check off. Default 50.
    pub check_every: usize,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            backend: ParallelBackend::Auto,
            bucket_mb: 25,
            check_every: 50,
        }
    }
}

/// The collective backend of a data-parallel run (`parallel.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParallelBackend {
    /// Chosen from the launcher's environment.
    Auto,
    /// MPI (CPU tensors; the build's `mpi` feature).
    Mpi,
    /// NCCL (CUDA tensors; the build's `nccl` feature).
    Nccl,
    /// One process only.
    None,
}

/// `[train]`: optimisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Optimizer steps of the student (and of the baseline). Default 300.
    pub steps: usize,
    /// Windows per batch. Default 16.
    pub batch_size: usize,
    /// Tokens per window; at most the context of teacher and student. Default 64.
    pub seq_len: usize,
    /// Where training windows start: `"random"` (any token) or `"aligned"` (multiples of
    /// `seq_len`, the windows a teacher cache stores). Default: `"aligned"` with a cached
    /// teacher, `"random"` otherwise.
    pub windows: Option<WindowSampling>,
    /// Peak learning rate of AdamW: a number or a schedule. Default 3e-3.
    pub lr: ScalarSpec,
    /// Factor on `lr` over progress. Default `{ kind = "warmup_cosine", warmup = 0.05, min_ratio = 0.1 }`.
    pub lr_schedule: ComponentSpec,
    /// Decoupled weight decay on matrices (not on biases, norms or embeddings). Default 0.01.
    pub weight_decay: f64,
    /// AdamW beta1. Default 0.9.
    pub beta1: f64,
    /// AdamW beta2. Default 0.95.
    pub beta2: f64,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f64,
    /// Clip gradients to this global L2 norm; 0 disables. Default 1.0.
    pub grad_clip: f64,
    /// Write a metrics record every this many steps. Default 10.
    pub log_every: usize,
    /// Evaluate on the validation split every this many steps; 0 = only at the end. Default:
    /// about ten evaluations of the student and of the baseline (`steps / 10`), none during
    /// teacher pretraining.
    pub eval_every: Option<usize>,
    /// Write a resumable checkpoint (`checkpoints/<phase>/step-N/`) every this many steps;
    /// 0 turns them off. Default 100.
    pub checkpoint_every: usize,
    /// Resumable checkpoints kept per phase (the newest). Default 2.
    pub keep_checkpoints: usize,
    /// Micro-batches per optimizer step (effective batch = `batch_size * grad_accum`). Default 1.
    pub grad_accum: usize,
    /// Parameter groups by regex over parameter names (full match, first match wins).
    /// Parameters no group matches use `lr_mult = 1` and the default decay rule (matrices decay;
    /// biases, norms and embeddings do not). Default: none.
    pub param_groups: Vec<ParamGroupSpec>,
    /// Stop after this many consecutive steps skipped for a non-finite loss or gradient.
    /// Default 10.
    pub max_consecutive_skips: usize,
    /// Keep an exponential moving average of the trained model's weights with this decay in
    /// `[0, 1)` (`ema = d * ema + (1 - d) * w` after every applied step); the phase then ends
    /// with the EMA weights, which are evaluated and exported. Default: off.
    pub ema_decay: Option<f64>,
    /// Early stopping of the student and baseline on an evaluation metric. Default: off.
    pub early_stopping: Option<EarlyStoppingSpec>,
    /// The logit terms fused with the student's output head (`[train.lm_head]`).
    pub lm_head: LmHeadSpec,
    /// Scaling of the loss before the backward pass (half-precision gradients):
    /// `"auto"` (dynamic where the student computes in f16, none otherwise), `"dynamic"`,
    /// `"none"` or a fixed positive number. Default `"auto"`. See [`crate::loss_scale`].
    pub loss_scale: crate::loss_scale::LossScale,
}

/// `[train.lm_head]`: computing the logit terms fused with the student's output head, in chunks
/// of tokens, so that the `[tokens, vocabulary]` logits of the step never exist whole.
///
/// Used when every term of the objective has a per-token form (the logit terms: `kl`,
/// `reverse_kl`, `jsd`, `skew_kl`, `tvd`, `topk_kl`, `sampled_reverse_kl`, `ce`), the student offers its head (the
/// built-in `transformer` and `llama` students) and the router weighs without reading the step
/// (`static`, `curriculum`); `retort check` says which path a run takes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LmHeadSpec {
    /// Fuse when the objective allows it. Default true; `false` always computes the full logits.
    pub fused: bool,
    /// Tokens per chunk; 0 picks 256, or fewer where one chunk's f32 logits would pass 128 MiB
    /// (vocabularies above 131,072; at least 16). Default 0.
    pub chunk_tokens: usize,
}

impl Default for LmHeadSpec {
    fn default() -> Self {
        LmHeadSpec {
            fused: true,
            chunk_tokens: 0,
        }
    }
}

/// Where training windows start (`train.windows`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowSampling {
    /// Uniformly random start offsets.
    Random,
    /// Random windows among those starting at multiples of `seq_len` (the validation windows
    /// and a teacher cache use the same grid).
    Aligned,
}

/// One parameter group: `{ pattern = ".*wte.*", lr_mult = 0.1, weight_decay = 0.0 }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParamGroupSpec {
    /// Regex that must match a parameter's whole name (e.g. `transformer\\.h\\.0\\..*`).
    pub pattern: String,
    /// Factor on the learning rate; 0 freezes (no optimizer state, weights bit-identical).
    /// Default 1.
    #[serde(default = "one_f64")]
    pub lr_mult: f64,
    /// Weight decay for the group's parameters. Default: `train.weight_decay` on matrices that
    /// are not embeddings, 0 elsewhere.
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

fn one_f64() -> f64 {
    1.0
}

impl Default for TrainSection {
    fn default() -> Self {
        let mut sched = ComponentSpec::new("warmup_cosine");
        sched.params.insert("warmup".into(), 0.05.into());
        sched.params.insert("min_ratio".into(), 0.1.into());
        TrainSection {
            steps: 300,
            batch_size: 16,
            seq_len: 64,
            windows: None,
            lr: 3e-3.into(),
            lr_schedule: sched,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: None,
            checkpoint_every: 100,
            keep_checkpoints: 2,
            grad_accum: 1,
            param_groups: Vec::new(),
            max_consecutive_skips: 10,
            ema_decay: None,
            early_stopping: None,
            lm_head: LmHeadSpec::default(),
            loss_scale: crate::loss_scale::LossScale::Auto,
        }
    }
}

/// `[eval]`: evaluation and the scratch baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Also train the student from scratch (hard labels only, same init, same batches, same
    /// budget) and report it beside the distilled one. Default true.
    pub baseline: bool,
    /// Validation batches per evaluation (windows taken in order from the val split). Default 32.
    pub batches: usize,
    /// Windows per validation batch. Default 16.
    pub batch_size: usize,
    /// Sample continuations of validation prompts from every model of the run and score them
    /// (`[eval.generation]`). Default: on, with its defaults, when `[on_policy]` is set; off
    /// otherwise.
    pub generation: Option<GenerationEvalSpec>,
}

/// `[eval.generation]`: what a model *generates*, scored. Prompts are the starts of the first
/// `prompts` validation windows; every model continues them with the same seed; the report
/// gives each model's mean completion length, end-of-sequence rate, the teacher's NLL of the
/// sampled tokens and, for a data source that knows its true distribution (`synthetic`), their
/// true NLL under the source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationEvalSpec {
    /// Prompts (validation windows). Default 64.
    pub prompts: usize,
    /// Prompt tokens, in `[1, train.seq_len]`. Default: `on_policy.prompt_tokens`, else
    /// `train.seq_len / 2`.
    pub prompt_tokens: Option<usize>,
    /// Tokens sampled per prompt at most, in `[1, train.seq_len + 1 - prompt_tokens]`.
    /// Default: `on_policy.max_new_tokens` (unless `prompt_tokens` is set here), else the
    /// largest.
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy. Default 1.0.
    pub temperature: f64,
    /// Nucleus, in `(0, 1]`. Default 1.0.
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only; 0 is no limit. Default 0.
    pub top_k: usize,
}

impl Default for GenerationEvalSpec {
    fn default() -> Self {
        GenerationEvalSpec {
            prompts: 64,
            prompt_tokens: None,
            max_new_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        EvalSection {
            baseline: true,
            batches: 32,
            batch_size: 16,
            generation: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_through_json() {
        let c = RunConfig::default();
        let v = serde_json::to_value(&c).expect("to json");
        let back: RunConfig = serde_json::from_value(v).expect("from json");
        assert_eq!(back.loss, c.loss);
        assert_eq!(back.teacher, c.teacher);
    }

    #[test]
    fn unknown_train_key_is_rejected_with_accepted_keys() {
        let v = serde_json::json!({"train": {"stpes": 3}});
        let err = serde_path_to_error::deserialize::<_, RunConfig>(v).expect_err("must fail");
        assert_eq!(err.path().to_string(), "train.stpes");
        let msg = err.into_inner().to_string();
        assert!(msg.contains("expected one of") && msg.contains("`steps`"), "{msg}");
    }
}
