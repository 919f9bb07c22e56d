//! How the run obtains its teacher: loaded from its params (a checkpoint, a cache), or
//! pretrained by the pipeline as a student of the same kind and then loaded.

use std::path::Path;

use serde_json::Value;

use retort_core::config::RunConfig;
use retort_core::{BuildContext, DataSource, Error, FrozenTeacher, ModelInfo, Params, Result, ScalarSpec, Teacher};

use super::checks::model_fits;
use super::tokenizer_identity::{checkpoint_of, of_checkpoint};
use super::vocab::{check_tokenizer, fit_teacher};

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

/// The teacher as assembly resolved it.
pub(super) struct ResolvedTeacher {
    /// How the run obtains it.
    pub plan: TeacherPlan,
    /// The teacher, loaded now ([`TeacherPlan::Load`]).
    pub loaded: Option<Box<dyn Teacher>>,
    /// An untrained model of the architecture to pretrain, to check taps against.
    pub probe: Option<Box<dyn Teacher>>,
    /// Its shape.
    pub info: ModelInfo,
}

impl ResolvedTeacher {
    /// The loaded teacher, or the untrained probe of one to pretrain.
    pub fn model(&self) -> Option<&dyn Teacher> {
        self.loaded.as_deref().or(self.probe.as_deref())
    }
}

/// Loads the teacher, or checks that the pipeline can pretrain it.
pub(super) fn resolve(config: &RunConfig, ctx: &BuildContext, data: &dyn DataSource) -> Result<ResolvedTeacher> {
    if config.teacher.precision.is_some() && config.teacher.params.contains_key("dtype") {
        return Err(Error::config(
            "teacher.precision",
            "set either teacher.precision or teacher.dtype, not both",
        ));
    }
    let registry = ctx.registry;
    let kind = &config.teacher.kind;
    let has_checkpoint = config.teacher.params.get("checkpoint").is_some_and(|v| !v.is_null());
    // A teacher kind the pipeline cannot train (e.g. `cached`) is always loaded from its params.
    let loadable_only =
        registry.teachers.get(kind, "teacher.kind").is_ok() && registry.students.get(kind, "teacher.kind").is_err();
    if has_checkpoint || loadable_only {
        load(config, ctx, data)
    } else {
        plan_pretraining(config, ctx)
    }
}

fn load(config: &RunConfig, ctx: &BuildContext, data: &dyn DataSource) -> Result<ResolvedTeacher> {
    if config.teacher.pretrain.is_some() {
        tracing::warn!("teacher.checkpoint is set: [teacher.pretrain] is ignored");
    }
    let teacher = ctx
        .registry
        .teachers
        .build(&config.teacher.kind, &load_params(config, None), ctx)?;
    let checkpoint = checkpoint_of(&config.teacher.params);
    let identity = of_checkpoint(teacher.tokenizer_identity(), checkpoint.as_deref())?;
    let proof = check_tokenizer("teacher", identity, data.tokenizer(), checkpoint.is_some())?;
    let teacher = fit_teacher(teacher, ctx.require_vocab("teacher")?, proof)?;
    teacher.check_data(data, config.train.seq_len)?;
    Ok(ResolvedTeacher {
        plan: TeacherPlan::Load,
        info: teacher.info(),
        loaded: Some(teacher),
        probe: None,
    })
}

fn plan_pretraining(config: &RunConfig, ctx: &BuildContext) -> Result<ResolvedTeacher> {
    let (registry, kind, t) = (ctx.registry, &config.teacher.kind, &config.train);
    registry.teachers.get(kind, "teacher.kind")?;
    if registry.students.get(kind, "teacher.kind").is_err() {
        return Err(Error::config(
            "teacher.checkpoint",
            format!("teacher kind `{kind}` cannot be trained by the pipeline; give a checkpoint"),
        ));
    }
    let probe = registry
        .students
        .build(kind, &Params::new("teacher", config.teacher.params.clone()), ctx)?;
    model_fits(
        "teacher",
        probe.vocab_size(),
        probe.context_len(),
        ctx.require_vocab("teacher")?,
        t.seq_len,
    )?;
    let pre = config.teacher.pretrain.as_ref();
    let steps = pre.map(|p| p.steps).unwrap_or(2 * t.steps);
    let lr = pre.and_then(|p| p.lr.clone()).unwrap_or_else(|| t.lr.clone());
    if steps == 0 {
        return Err(Error::config(
            "teacher.pretrain.steps",
            "expected an integer >= 1, got 0",
        ));
    }
    lr.build_positive("teacher.pretrain.lr", ctx)?;
    Ok(ResolvedTeacher {
        plan: TeacherPlan::Pretrain { steps, lr },
        info: probe.info(),
        loaded: None,
        probe: Some(Box::new(FrozenTeacher(probe))),
    })
}

/// The params the teacher kind is loaded with: the configured ones, `checkpoint = dir` if
/// given, and `dtype` from `teacher.precision`.
pub(super) fn load_params(config: &RunConfig, dir: Option<&Path>) -> Params {
    let mut p = config.teacher.params.clone();
    if let Some(dir) = dir {
        p.insert("checkpoint".into(), Value::String(dir.display().to_string()));
    }
    if let Some(precision) = config.teacher.precision {
        p.insert("dtype".into(), Value::String(precision.name().into()));
    }
    Params::new("teacher", p)
}

/// `student.init = { from_teacher = true }` without its own `checkpoint` copies from the
/// teacher's: fill it in from `teacher.checkpoint`.
pub(super) fn fill_init_from_teacher(config: &mut RunConfig) {
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
