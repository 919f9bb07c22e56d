//! Assembling a pipeline from a config: every component is built (or, for a teacher that must
//! be pretrained, resolved) and every cross-component constraint is checked before any
//! training starts, so a bad config fails in seconds with exit code 2.

pub mod config;
pub mod device;
pub mod plugin_loader;
pub mod vocab;

use candle_core::Device;
use serde_json::Value;

use retort_core::config::{RunConfig, WindowSampling};
use retort_core::{
    BuildContext, DataSource, Error, FrozenTeacher, Params, Registry, Result, Router, ScalarSpec, Schedule, Split,
    Student, Teacher,
};

use crate::assemble::device::parse_device;
use crate::engine::phase::{Stage, TermSlot};

/// How the run obtains its teacher.
pub enum TeacherPlan {
    /// Load with the teacher factory (the params name a checkpoint).
    Load,
    /// Train a student of the same kind with these params first, then load it.
    Pretrain {
        /// Optimizer steps.
        steps: usize,
        /// Peak learning rate.
        lr: ScalarSpec,
    },
}

/// A validated pipeline.
pub struct Pipeline<'r> {
    /// The resolved config.
    pub config: RunConfig,
    /// The registry everything was built from.
    pub registry: &'r Registry,
    /// Device of the run.
    pub device: Device,
    /// The data.
    pub data: Box<dyn DataSource>,
    /// Vocabulary size of the data's tokenizer.
    pub vocab_size: usize,
    /// How the teacher is obtained.
    pub teacher_plan: TeacherPlan,
    /// A teacher loaded during assembly (for [`TeacherPlan::Load`]).
    pub teacher: Option<Box<dyn Teacher>>,
    /// The loss terms.
    pub terms: Vec<TermSlot>,
    /// Description of the student architecture (built once to validate).
    pub student_description: String,
    /// Student parameter count.
    pub student_params: usize,
}

/// Seeds derived from the run seed, one stream per purpose.
pub mod seeds {
    /// Init of the pretrained teacher.
    pub fn teacher_init(seed: u64) -> u64 {
        seed ^ 0x7eac_4e12_0000_0001
    }
    /// Batches of teacher pretraining.
    pub fn teacher_batches(seed: u64) -> u64 {
        seed ^ 0x7eac_4e12_0000_0002
    }
    /// Init of the student (and of the baseline: the same).
    pub fn student_init(seed: u64) -> u64 {
        seed ^ 0x5700_de17_0000_0003
    }
    /// Batches of the student (and of the baseline: the same).
    pub fn student_batches(seed: u64) -> u64 {
        seed ^ 0x5700_de17_0000_0004
    }
}

impl<'r> Pipeline<'r> {
    /// Builds and checks everything `config` names.
    pub fn assemble(mut config: RunConfig, registry: &'r Registry) -> Result<Self> {
        fill_init_from_teacher(&mut config);
        let device = parse_device(&config.run.device)?;
        let t = &config.train;
        for (key, v) in [
            ("train.steps", t.steps),
            ("train.batch_size", t.batch_size),
            ("train.seq_len", t.seq_len),
            ("train.grad_accum", t.grad_accum),
        ] {
            if v == 0 {
                return Err(Error::config(key, "expected an integer >= 1, got 0"));
            }
        }
        for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(key, format!("expected a number in [0, 1), got {v}")));
            }
        }
        for (key, v) in [
            ("train.eps", t.eps),
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::config(key, format!("expected a finite number >= 0, got {v}")));
            }
        }
        if let Some(d) = t.ema_decay.filter(|d| !(0.0..1.0).contains(d)) {
            return Err(Error::config(
                "train.ema_decay",
                format!("expected a number in [0, 1), got {d}"),
            ));
        }
        if config.eval.batches == 0 || config.eval.batch_size == 0 {
            return Err(Error::config(
                "eval.batches",
                "eval.batches and eval.batch_size must be >= 1",
            ));
        }
        let ctx = BuildContext::new(registry, device.clone(), config.run.seed);
        t.lr.build_positive("train.lr", &ctx)?;
        let data = registry
            .data
            .build(&config.data.kind, &config.data.params_at("data"), &ctx)?;
        let vocab_size = data.tokenizer().vocab_size();
        for split in [Split::Train, Split::Val] {
            let n = data.tokens(split).len();
            if n <= t.seq_len {
                return Err(Error::input(
                    format!("data ({})", data.describe()),
                    format!(
                        "the {} split has {n} tokens, fewer than one window of train.seq_len = {} plus its target; \
                         use a longer corpus or a smaller train.seq_len",
                        if split == Split::Train {
                            "training"
                        } else {
                            "validation"
                        },
                        t.seq_len
                    ),
                ));
            }
        }
        let mut ctx = ctx;
        ctx.vocab_size = Some(vocab_size);

        // Student: built once to validate params, context and taps.
        let student = registry
            .students
            .build(&config.student.kind, &config.student.params_at("student"), &ctx)?;
        crate::assemble::vocab::check_tokenizer("student", student.tokenizer_identity(), data.tokenizer())?;
        let student = crate::assemble::vocab::fit_student(student, vocab_size)?;
        check_model(
            "student",
            student.vocab_size(),
            student.context_len(),
            vocab_size,
            t.seq_len,
        )?;

        // Teacher.
        let teacher_params = Params::new("teacher", config.teacher.params.clone());
        if config.teacher.precision.is_some() && config.teacher.params.contains_key("dtype") {
            return Err(Error::config(
                "teacher.precision",
                "set either teacher.precision or teacher.dtype, not both",
            ));
        }
        let has_checkpoint = config.teacher.params.get("checkpoint").is_some_and(|v| !v.is_null());
        let teacher_info;
        let mut probe_teacher: Option<Box<dyn Teacher>> = None;
        // A teacher kind the pipeline cannot train (e.g. `cached`) is always loaded from its params.
        let loadable_only = registry.teachers.get(&config.teacher.kind, "teacher.kind").is_ok()
            && registry.students.get(&config.teacher.kind, "teacher.kind").is_err();
        let (teacher_plan, teacher) = if has_checkpoint || loadable_only {
            if config.teacher.pretrain.is_some() {
                tracing::warn!("teacher.checkpoint is set: [teacher.pretrain] is ignored");
            }
            let teacher = registry
                .teachers
                .build(&config.teacher.kind, &teacher_load_params(&config, None), &ctx)?;
            crate::assemble::vocab::check_tokenizer("teacher", teacher.tokenizer_identity(), data.tokenizer())?;
            let teacher = crate::assemble::vocab::fit_teacher(teacher, vocab_size)?;
            teacher.check_data(data.as_ref(), t.seq_len)?;
            teacher_info = teacher.info();
            (TeacherPlan::Load, Some(teacher))
        } else {
            registry.teachers.get(&config.teacher.kind, "teacher.kind")?;
            if registry.students.get(&config.teacher.kind, "teacher.kind").is_err() {
                return Err(Error::config(
                    "teacher.checkpoint",
                    format!(
                        "teacher kind `{}` cannot be trained by the pipeline; give a checkpoint",
                        config.teacher.kind
                    ),
                ));
            }
            let probe = registry.students.build(&config.teacher.kind, &teacher_params, &ctx)?;
            check_model(
                "teacher",
                probe.vocab_size(),
                probe.context_len(),
                vocab_size,
                t.seq_len,
            )?;
            teacher_info = probe.info();
            let pre = config.teacher.pretrain.clone();
            let steps = pre.as_ref().map(|p| p.steps).unwrap_or(2 * t.steps);
            let lr = pre.as_ref().and_then(|p| p.lr.clone()).unwrap_or_else(|| t.lr.clone());
            if steps == 0 {
                return Err(Error::config(
                    "teacher.pretrain.steps",
                    "expected an integer >= 1, got 0",
                ));
            }
            lr.build_positive("teacher.pretrain.lr", &ctx)?;
            probe_teacher = Some(Box::new(FrozenTeacher(probe)));
            (TeacherPlan::Pretrain { steps, lr }, None)
        };
        ctx.student = Some(student.info());
        ctx.teacher = Some(teacher_info);
        ctx.teacher_topk = teacher.as_ref().and_then(|t| t.sparse_topk());
        // Windows: a teacher with outputs for aligned windows only fixes the sampling.
        let aligned = teacher.as_ref().and_then(|t| t.aligned_windows());
        match (aligned, config.train.windows) {
            (Some(_), Some(WindowSampling::Random)) => {
                return Err(Error::config(
                    "train.windows",
                    "the teacher serves stored windows that start at multiples of train.seq_len; \"random\" windows cannot be served: use \"aligned\" (the default with a cached teacher)",
                ))
            }
            (Some(_), None) => config.train.windows = Some(WindowSampling::Aligned),
            _ => {}
        }
        let t = &config.train;
        // Loss terms.
        if config.loss.is_empty() {
            return Err(Error::config("loss", "at least one loss term is required"));
        }
        let mut terms = Vec::new();
        for (i, spec) in config.loss.iter().enumerate() {
            let path = format!("loss[{i}]");
            let weight_path = format!("{path}.weight");
            let weight = spec.weight.build(&weight_path, &ctx)?;
            weight.check(&weight_path, f64::is_finite, "a finite number")?;
            let term = registry.losses.build(&spec.kind, &spec.params_at(&path), &ctx)?;
            let repeated = config.loss.iter().filter(|s| s.kind == spec.kind).count() > 1;
            let name = spec.name.clone().unwrap_or_else(|| {
                if repeated {
                    format!("{}_{i}", spec.kind)
                } else {
                    spec.kind.clone()
                }
            });
            let student_taps = student.available_taps();
            for tap in term.student_taps() {
                if !student_taps.contains(&tap) {
                    return Err(Error::config(
                        path.clone(),
                        format!("asks for student tap `{tap}`, which the student does not have"),
                    ));
                }
            }
            if let (Some(k), true) = (ctx.teacher_topk, term.needs_teacher_logits()) {
                return Err(Error::config(
                    path.clone(),
                    format!(
                        "`{}` needs the teacher's dense logits, and the teacher ({}) has only its top-{k} log-probs; use `kl` or `topk_kl`, or a live teacher",
                        spec.kind,
                        config.teacher.kind
                    ),
                ));
            }
            terms.push(TermSlot { name, weight, term });
        }
        let needs_teacher = terms.iter().any(|t| t.term.needs_teacher());

        // Parameter groups: every pattern valid and matching (student and term parameters).
        let mut vars = student.vars();
        for slot in &terms {
            vars.extend(
                slot.term
                    .vars()
                    .into_iter()
                    .map(|(n, v)| (format!("loss.{}.{n}", slot.name), v)),
            );
        }
        crate::engine::optim::assign_groups(vars.clone(), &t.param_groups, t.weight_decay, "train.param_groups")?;

        // Stages: every override valid; loss weights name existing terms.
        let names: Vec<String> = terms.iter().map(|t| t.name.clone()).collect();
        let mut stage_names = std::collections::HashSet::new();
        for (i, st) in config.stages.iter().enumerate() {
            let key = format!("stages[{i}]");
            if st.steps == 0 {
                return Err(Error::config(format!("{key}.steps"), "expected an integer >= 1, got 0"));
            }
            if st.grad_accum == Some(0) {
                return Err(Error::config(
                    format!("{key}.grad_accum"),
                    "expected an integer >= 1, got 0",
                ));
            }
            if !stage_names.insert(st.name_or_default(i)) {
                return Err(Error::config(
                    format!("{key}.name"),
                    format!("stage name `{}` is used twice", st.name_or_default(i)),
                ));
            }
            for (k, v) in [("weight_decay", st.weight_decay), ("grad_clip", st.grad_clip)] {
                if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                    return Err(Error::config(
                        format!("{key}.{k}"),
                        format!("expected a finite number >= 0, got {v}"),
                    ));
                }
            }
            for term in st.loss_weights.keys() {
                if !names.contains(term) {
                    return Err(Error::config(
                        format!("{key}.loss_weights.{term}"),
                        format!("no loss term is named `{term}`; the terms are: {}", names.join(", ")),
                    ));
                }
            }
            if let Some(groups) = &st.param_groups {
                crate::engine::optim::assign_groups(
                    vars.clone(),
                    groups,
                    st.weight_decay.unwrap_or(t.weight_decay),
                    &format!("{key}.param_groups"),
                )?;
            }
        }
        if let Some(es) = &t.early_stopping {
            if t.eval_every == 0 {
                return Err(Error::config(
                    "train.early_stopping",
                    "early stopping evaluates every train.eval_every steps; set train.eval_every > 0",
                ));
            }
            if es.patience == 0 {
                return Err(Error::config(
                    "train.early_stopping.patience",
                    "expected an integer >= 1, got 0",
                ));
            }
            if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
                return Err(Error::config(
                    "train.early_stopping.min_delta",
                    format!("expected a finite number >= 0, got {}", es.min_delta),
                ));
            }
        }

        // Router and schedule: build once to validate.
        build_router(&config, registry, &ctx)?.check_terms(&names)?;
        build_lr_schedule(&config, registry, &ctx)?;
        student_stages_for(&config, registry, &ctx, &terms)?;

        if let Some(teacher) = &teacher {
            check_model(
                "teacher",
                teacher.vocab_size(),
                teacher.context_len(),
                vocab_size,
                t.seq_len,
            )?;
        }
        if let Some(teacher) = teacher.as_ref().or(probe_teacher.as_ref()) {
            for (i, term) in terms.iter().enumerate() {
                for tap in term.term.teacher_taps() {
                    if !teacher.supports_tap(&tap) {
                        return Err(Error::config(
                            format!("loss[{i}]"),
                            format!("asks for teacher tap `{tap}`, which the teacher does not have"),
                        ));
                    }
                }
            }
        }
        if !needs_teacher {
            tracing::warn!("no loss term reads the teacher: this run trains the student on hard labels only");
        }
        Ok(Pipeline {
            student_description: student.describe(),
            student_params: student.num_params(),
            config,
            registry,
            device,
            data,
            vocab_size,
            teacher_plan,
            teacher,
            terms,
        })
    }

    /// A build context on the run's device with the data vocabulary and `seed`.
    pub fn context(&self, seed: u64) -> BuildContext<'r> {
        let mut ctx = BuildContext::new(self.registry, self.device.clone(), seed);
        ctx.vocab_size = Some(self.vocab_size);
        ctx
    }

    /// Optimizer steps of the student (the sum of the stages' steps, or `train.steps`).
    pub fn student_steps(&self) -> usize {
        student_steps(&self.config)
    }

    /// The student phase's stages, built fresh (schedules hold no state across phases).
    pub fn student_stages(&self, ctx: &BuildContext) -> Result<Vec<Stage>> {
        student_stages_for(&self.config, self.registry, ctx, &self.terms)
    }

    /// A fresh student with the given init seed (logits narrowed to the data's vocabulary if
    /// padded).
    pub fn build_student(&self, seed: u64) -> Result<Box<dyn Student>> {
        let s = self.registry.students.build(
            &self.config.student.kind,
            &self.config.student.params_at("student"),
            &self.context(seed),
        )?;
        crate::assemble::vocab::fit_student(s, self.vocab_size)
    }

    /// The teacher loaded from `params` (logits narrowed to the data's vocabulary if padded).
    pub fn build_teacher(&self, params: &Params) -> Result<Box<dyn Teacher>> {
        let t = self
            .registry
            .teachers
            .build(&self.config.teacher.kind, params, &self.context(self.config.run.seed))?;
        crate::assemble::vocab::fit_teacher(t, self.vocab_size)
    }
}

/// Optimizer steps of the student phase.
pub fn student_steps(config: &RunConfig) -> usize {
    if config.stages.is_empty() {
        config.train.steps
    } else {
        config.stages.iter().map(|s| s.steps).sum()
    }
}

fn student_stages_for(
    config: &RunConfig,
    registry: &Registry,
    ctx: &BuildContext,
    terms: &[TermSlot],
) -> Result<Vec<Stage>> {
    let t = &config.train;
    if config.stages.is_empty() {
        return Ok(vec![Stage::whole(
            t.steps,
            t.lr.build("train.lr", ctx)?,
            build_lr_schedule(config, registry, ctx)?,
            t,
        )]);
    }
    config
        .stages
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let key = format!("stages[{i}]");
            let lr = match &st.lr {
                Some(lr) => lr.build_positive(&format!("{key}.lr"), ctx)?,
                None => t.lr.build("train.lr", ctx)?,
            };
            let lr_schedule = match &st.lr_schedule {
                Some(s) => registry
                    .schedules
                    .build(&s.kind, &s.params_at(&format!("{key}.lr_schedule")), ctx)?,
                None => build_lr_schedule(config, registry, ctx)?,
            };
            let weights = if st.loss_weights.is_empty() {
                None
            } else {
                let mut w = Vec::with_capacity(terms.len());
                for (j, slot) in terms.iter().enumerate() {
                    w.push(match st.loss_weights.get(&slot.name) {
                        Some(spec) => {
                            let path = format!("{key}.loss_weights.{}", slot.name);
                            let s = spec.build(&path, ctx)?;
                            s.check(&path, f64::is_finite, "a finite number")?;
                            s
                        }
                        None => config.loss[j].weight.build(&format!("loss[{j}].weight"), ctx)?,
                    });
                }
                Some(w)
            };
            Ok(Stage {
                name: st.name_or_default(i),
                steps: st.steps,
                lr,
                lr_schedule,
                param_groups: st.param_groups.clone().unwrap_or_else(|| t.param_groups.clone()),
                groups_key: if st.param_groups.is_some() {
                    format!("{key}.param_groups")
                } else {
                    "train.param_groups".into()
                },
                weight_decay: st.weight_decay.unwrap_or(t.weight_decay),
                grad_clip: st.grad_clip.unwrap_or(t.grad_clip),
                grad_accum: st.grad_accum.unwrap_or(t.grad_accum).max(1),
                weights,
            })
        })
        .collect()
}

/// A fresh router of the configured kind.
pub fn build_router(config: &RunConfig, registry: &Registry, ctx: &BuildContext) -> Result<Box<dyn Router>> {
    registry
        .routers
        .build(&config.router.kind, &config.router.params_at("router"), ctx)
}

/// A fresh learning-rate schedule of the configured kind.
pub fn build_lr_schedule(config: &RunConfig, registry: &Registry, ctx: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s = &config.train.lr_schedule;
    registry
        .schedules
        .build(&s.kind, &s.params_at("train.lr_schedule"), ctx)
}

fn check_model(who: &str, vocab: usize, context: usize, data_vocab: usize, seq_len: usize) -> Result<()> {
    if vocab != data_vocab {
        return Err(Error::Incompatible(format!(
            "the {who} has a vocabulary of {vocab} tokens, the data's tokenizer has {data_vocab}"
        )));
    }
    if context < seq_len {
        return Err(Error::config(
            format!("{who}.context"),
            format!("the {who}'s context of {context} is shorter than train.seq_len = {seq_len}"),
        ));
    }
    Ok(())
}

/// `student.init = { from_teacher = true }` without its own `checkpoint` copies from the
/// teacher's: fill it in from `teacher.checkpoint`.
fn fill_init_from_teacher(config: &mut RunConfig) {
    let Some(ckpt) = config
        .teacher
        .params
        .get("checkpoint")
        .filter(|v| !v.is_null())
        .cloned()
    else {
        return;
    };
    if let Some(Value::Object(init)) = config.student.params.get_mut("init") {
        if init.get("from_teacher") == Some(&Value::Bool(true)) && !init.contains_key("checkpoint") {
            init.insert("checkpoint".into(), ckpt);
        }
    }
}

/// The teacher params with `checkpoint` pointing at `dir` (after pretraining).
pub fn teacher_params_with_checkpoint(config: &RunConfig, dir: &std::path::Path) -> Params {
    teacher_load_params(config, Some(dir))
}

/// The params the teacher kind is loaded with: the configured ones, `checkpoint = dir` if
/// given, and `dtype` from `teacher.precision`.
fn teacher_load_params(config: &RunConfig, dir: Option<&std::path::Path>) -> Params {
    let mut p = config.teacher.params.clone();
    if let Some(dir) = dir {
        p.insert("checkpoint".into(), Value::String(dir.display().to_string()));
    }
    if let Some(precision) = config.teacher.precision {
        p.insert("dtype".into(), Value::String(precision.name().into()));
    }
    Params::new("teacher", p)
}
