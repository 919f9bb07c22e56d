//! Assembly: a config becomes a validated [`Pipeline`]. Every component is built (or, for a
//! teacher that must be pretrained, resolved) and every cross-component constraint is checked
//! before any training starts, so a bad config fails in seconds with exit code 2 and a message
//! naming the key path. The engine then asks the pipeline for each phase's setup.

mod checks;
pub mod config;
pub mod device;
mod generation;
mod head_path;
mod memory;
pub mod model_file;
pub mod observers;
mod on_policy;
mod param_groups;
pub mod plugin_loader;
pub mod prompts;
pub mod seeds;
mod stages;
mod teacher;
mod terms;
pub mod tokenizer_identity;
pub mod vocab;

use std::path::Path;

use candle_core::Device;

use retort_core::config::{EarlyStoppingSpec, RunConfig, WindowSampling};
use retort_core::{BuildContext, DataSource, Error, Params, Registry, Result, Router, Student, Teacher};

pub use generation::GenerationPlan;
pub use head_path::HeadPath;
pub use memory::MemoryEstimate;
pub use on_policy::OnPolicyPlan;
pub use param_groups::{assign_groups, decays, GroupedParam};
pub use stages::{student_steps, Stage};
pub use teacher::TeacherPlan;
pub use terms::TermSlot;

use device::parse_device;
use teacher::ResolvedTeacher;
use vocab::RowProof;

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
    /// The loss terms of the distillation.
    pub terms: Vec<TermSlot>,
    /// The objective of teacher pretraining and of the baseline: `ce`.
    pub hard_labels: Vec<TermSlot>,
    /// Description of the student architecture (built once to validate).
    pub student_description: String,
    /// Student parameter count.
    pub student_params: usize,
    /// The taps the student can produce.
    pub student_taps: Vec<String>,
    /// What is known of the student's output rows (whether padding may be narrowed).
    pub student_rows: RowProof,
    /// The memory the run needs on its device.
    pub memory: MemoryEstimate,
    /// How the distillation samples (`[on_policy]`), if it does.
    pub on_policy: Option<OnPolicyPlan>,
    /// What the models generate for the report (`[eval.generation]`), if asked.
    pub generation: Option<GenerationPlan>,
    /// Data-parallel ranks the run is assembled for (each reads `batch_size / ranks` windows
    /// of every batch); 1 for one process.
    pub ranks: usize,
}

/// What a training phase needs, built fresh for it (routers and schedules keep state).
pub struct PhaseSetup<'p> {
    /// `teacher`, `student` or `baseline`.
    pub label: &'static str,
    /// The model to train, freshly initialised.
    pub model: Box<dyn Student>,
    /// The objective.
    pub terms: &'p [TermSlot],
    /// Weighs the terms.
    pub router: Box<dyn Router>,
    /// The stages, in order.
    pub stages: Vec<Stage>,
    /// Seed of the batch sequence.
    pub batch_seed: u64,
    /// Evaluate every this many steps (0: none during the phase).
    pub eval_every: usize,
    /// Early stopping, when on for the phase.
    pub early_stopping: Option<&'p EarlyStoppingSpec>,
    /// Whether the phase sees the teacher (its terms, and agreement and KL in evaluations).
    pub with_teacher: bool,
    /// Which steps train on samples, and how they are drawn.
    pub on_policy: Option<&'p OnPolicyPlan>,
}

impl<'r> Pipeline<'r> {
    /// Builds and checks everything `config` names, for one process.
    pub fn assemble(config: RunConfig, registry: &'r Registry) -> Result<Self> {
        Self::assemble_for(config, registry, 1)
    }

    /// Builds and checks everything `config` names, for one of `ranks` data-parallel ranks
    /// (which must divide `train.batch_size`).
    pub fn assemble_for(mut config: RunConfig, registry: &'r Registry, ranks: usize) -> Result<Self> {
        teacher::fill_init_from_teacher(&mut config);
        let device = parse_device(&config.run.device)?;
        checks::run_name(&config.run)?;
        checks::train_and_eval(&config.train, &config.eval)?;
        checks::batch_over_ranks(&config.train, &config.parallel, ranks)?;
        let mut ctx = BuildContext::new(registry, device.clone(), config.run.seed);
        config.train.lr.build_positive("train.lr", &ctx)?;
        let data = registry
            .data
            .build(&config.data.kind, &config.data.params_at("data"), &ctx)?;
        let vocab_size = data.tokenizer().vocab_size();
        checks::data_lengths(data.as_ref(), config.train.seq_len)?;
        ctx.vocab_size = Some(vocab_size);
        let (student, student_rows) = checked_student(&config, &ctx, data.as_ref())?;
        let teacher = teacher::resolve(&config, &ctx, data.as_ref())?;
        ctx.student = Some(student.info());
        ctx.teacher = Some(teacher.info);
        ctx.teacher_topk = teacher.loaded.as_ref().and_then(|t| t.sparse_topk());
        fix_window_sampling(&mut config, &teacher)?;
        let terms = terms::build(&config, &ctx, student.as_ref())?;
        check_objective(&config, &ctx, student.as_ref(), &terms, &teacher)?;
        let on_policy = OnPolicyPlan::resolve(&config, &terms, teacher.loaded.as_deref(), data.as_ref())?;
        let val_tokens = data.tokens(retort_core::Split::Val).len();
        let generation = GenerationPlan::resolve(&config, data.as_ref(), val_tokens)?;
        observers::validate(&config, &ctx)?;
        let memory = estimate_memory(&config, &ctx, student.as_ref(), &terms, &teacher, ranks)?;
        memory.check()?;
        Ok(Pipeline {
            student_description: student.describe(),
            student_params: student.num_params(),
            student_taps: student.available_taps(),
            student_rows,
            memory,
            hard_labels: TermSlot::hard_labels(&ctx)?,
            config,
            registry,
            device,
            data,
            vocab_size,
            teacher_plan: teacher.plan,
            teacher: teacher.loaded,
            terms,
            on_policy,
            generation,
            ranks,
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

    /// The labels of the phases this run trains, in order.
    pub fn phases(&self) -> Vec<&'static str> {
        let mut phases = Vec::new();
        if matches!(self.teacher_plan, TeacherPlan::Pretrain { .. }) {
            phases.push("teacher");
        }
        phases.push("student");
        if self.compares_off_policy() {
            phases.push("offpolicy");
        }
        if self.config.eval.baseline {
            phases.push("baseline");
        }
        phases
    }

    /// Teacher pretraining: the teacher's architecture trained on hard labels (`None` for a
    /// teacher loaded from its params).
    pub fn teacher_pretraining(&self) -> Result<Option<PhaseSetup<'_>>> {
        let TeacherPlan::Pretrain { steps, lr } = &self.teacher_plan else {
            return Ok(None);
        };
        let cfg = &self.config;
        let ctx = self.context(seeds::teacher_init(cfg.run.seed));
        let params = Params::new("teacher", cfg.teacher.params.clone());
        let lr = lr.build("teacher.pretrain.lr", &ctx)?;
        Ok(Some(PhaseSetup {
            label: "teacher",
            model: self.registry.students.build(&cfg.teacher.kind, &params, &ctx)?,
            terms: &self.hard_labels,
            router: static_router(&ctx)?,
            stages: vec![Stage::whole(*steps, lr, stages::lr_schedule(cfg, &ctx)?, &cfg.train)],
            batch_seed: seeds::teacher_batches(cfg.run.seed),
            eval_every: cfg.train.eval_every.unwrap_or(0),
            early_stopping: None,
            with_teacher: false,
            on_policy: None,
        }))
    }

    /// A fresh router of the distillation (the configured kind).
    pub fn router(&self) -> Result<Box<dyn Router>> {
        build_router(&self.config, &self.context(seeds::student_init(self.config.run.seed)))
    }

    /// The distillation of the student: the configured objective, router and stages.
    pub fn distillation(&self) -> Result<PhaseSetup<'_>> {
        let ctx = self.context(seeds::student_init(self.config.run.seed));
        Ok(PhaseSetup {
            label: "student",
            model: self.build_student(seeds::student_init(self.config.run.seed))?,
            terms: &self.terms,
            router: build_router(&self.config, &ctx)?,
            stages: stages::student_stages(&self.config, &ctx, &self.terms)?,
            batch_seed: seeds::student_batches(self.config.run.seed),
            eval_every: self.student_eval_every(),
            early_stopping: self.config.train.early_stopping.as_ref(),
            with_teacher: true,
            on_policy: self.on_policy.as_ref(),
        })
    }

    /// Whether the run also trains the student off-policy to compare it with the on-policy one
    /// (`on_policy.compare_off_policy`, when some steps sample).
    pub fn compares_off_policy(&self) -> bool {
        let samples = self
            .on_policy
            .as_ref()
            .is_some_and(|p| p.sampled_steps(&self.config) > 0);
        samples && self.config.on_policy.as_ref().is_some_and(|s| s.compare_off_policy)
    }

    /// The off-policy reference of an on-policy run: the distillation as configured on the
    /// data's windows only (phase `offpolicy`: same init, batches and budget). `None` unless
    /// [`Pipeline::compares_off_policy`].
    pub fn off_policy_reference(&self) -> Result<Option<PhaseSetup<'_>>> {
        if !self.compares_off_policy() {
            return Ok(None);
        }
        Ok(Some(PhaseSetup {
            label: "offpolicy",
            on_policy: None,
            ..self.distillation()?
        }))
    }

    /// The scratch baseline: the same student, init and batches on hard labels, with the same
    /// budget in one stage of `[train]` (a stage training only the distillation projections has
    /// no meaning without a teacher). `None` when `eval.baseline = false`.
    pub fn baseline(&self) -> Result<Option<PhaseSetup<'_>>> {
        if !self.config.eval.baseline {
            return Ok(None);
        }
        let (cfg, ctx) = (&self.config, self.context(seeds::student_init(self.config.run.seed)));
        let lr = cfg.train.lr.build("train.lr", &ctx)?;
        let stage = Stage::whole(self.student_steps(), lr, stages::lr_schedule(cfg, &ctx)?, &cfg.train);
        Ok(Some(PhaseSetup {
            label: "baseline",
            model: self.build_student(seeds::student_init(cfg.run.seed))?,
            terms: &self.hard_labels,
            router: static_router(&ctx)?,
            stages: vec![stage],
            batch_seed: seeds::student_batches(cfg.run.seed),
            eval_every: self.student_eval_every(),
            early_stopping: cfg.train.early_stopping.as_ref(),
            with_teacher: true,
            on_policy: None,
        }))
    }

    /// How often the student and the baseline are evaluated: `train.eval_every`, by default
    /// about ten times over the phase (so that the report's curves show them separate).
    fn student_eval_every(&self) -> usize {
        self.config
            .train
            .eval_every
            .unwrap_or((self.student_steps() / 10).max(1))
    }

    /// A fresh student with the given init seed (logits narrowed to the data's vocabulary if
    /// padded).
    pub fn build_student(&self, seed: u64) -> Result<Box<dyn Student>> {
        let s = self.registry.students.build(
            &self.config.student.kind,
            &self.config.student.params_at("student"),
            &self.context(seed),
        )?;
        vocab::fit_student(s, self.vocab_size, self.student_rows)
    }

    /// The student (or baseline) saved in `dir` by a finished phase; its weights replace any
    /// initialisation recipe.
    pub fn trained_student(&self, dir: &Path) -> Result<Box<dyn Student>> {
        let mut params = self.config.student.params.clone();
        params.remove("init");
        params.insert(
            "checkpoint".into(),
            serde_json::Value::String(dir.display().to_string()),
        );
        let s = self.registry.students.build(
            &self.config.student.kind,
            &Params::new("student", params),
            &self.context(self.config.run.seed),
        )?;
        vocab::fit_student(s, self.vocab_size, RowProof::ThisData)
    }

    /// The teacher pretrained into `dir` (logits narrowed to the data's vocabulary if padded).
    pub fn pretrained_teacher(&self, dir: &Path) -> Result<Box<dyn Teacher>> {
        let params = teacher::load_params(&self.config, Some(dir));
        let ctx = self.context(self.config.run.seed);
        let t = self.registry.teachers.build(&self.config.teacher.kind, &params, &ctx)?;
        vocab::fit_teacher(t, self.vocab_size, RowProof::ThisData)
    }
}

/// The student built once to validate params, tokenizer, vocabulary and context.
fn checked_student(
    config: &RunConfig,
    ctx: &BuildContext,
    data: &dyn DataSource,
) -> Result<(Box<dyn Student>, RowProof)> {
    let student = ctx
        .registry
        .students
        .build(&config.student.kind, &config.student.params_at("student"), ctx)?;
    let checkpoint = tokenizer_identity::checkpoint_of(&config.student.params);
    let identity = tokenizer_identity::of_checkpoint(student.tokenizer_identity(), checkpoint.as_deref())?;
    let proof = vocab::check_tokenizer("student", identity, data.tokenizer(), checkpoint.is_some())?;
    let vocab = data.tokenizer().vocab_size();
    let student = vocab::fit_student(student, vocab, proof)?;
    let (v, c) = (student.vocab_size(), student.context_len());
    checks::model_fits("student", v, c, vocab, config.train.seq_len)?;
    Ok((student, proof))
}

/// Whether `config` can run as `ranks` data-parallel ranks (its batch divides evenly).
pub fn check_ranks(config: &RunConfig, ranks: usize) -> Result<()> {
    checks::batch_over_ranks(&config.train, &config.parallel, ranks)
}

/// The run's memory estimate (of one rank of `ranks`) from the models' shapes, the batch and
/// the logits' path.
fn estimate_memory(
    config: &RunConfig,
    ctx: &BuildContext,
    student: &dyn Student,
    terms: &[TermSlot],
    teacher: &ResolvedTeacher,
    ranks: usize,
) -> Result<MemoryEstimate> {
    let t = &config.train;
    let batch = t.batch_size / ranks.max(1);
    let router = build_router(config, ctx)?;
    let taps = student.available_taps();
    let path = HeadPath::choose(
        &t.lm_head,
        terms,
        router.as_ref(),
        &taps,
        student.vocab_size(),
        batch.saturating_mul(t.seq_len),
    );
    let head_chunk = match path {
        HeadPath::Fused { chunk } => Some(chunk),
        HeadPath::Full(_) => None,
    };
    let size = |info, params| memory::ModelSize { info, params };
    let work = memory::Workload {
        batch,
        seq_len: t.seq_len,
        head_chunk,
        ema: t.ema_decay.is_some(),
    };
    Ok(MemoryEstimate::new(
        size(student.info(), student.num_params()),
        teacher.model().map(|m| size(m.info(), m.num_params())),
        matches!(teacher.plan, TeacherPlan::Pretrain { .. }),
        work,
        &ctx.device,
    ))
}

/// A teacher with outputs for aligned windows only fixes the window sampling.
fn fix_window_sampling(config: &mut RunConfig, teacher: &ResolvedTeacher) -> Result<()> {
    let aligned = teacher.loaded.as_ref().and_then(|t| t.aligned_windows());
    match (aligned, config.train.windows) {
        (Some(_), Some(WindowSampling::Random)) => Err(Error::config(
            "train.windows",
            "the teacher serves stored windows that start at multiples of train.seq_len; \"random\" windows \
             cannot be served: use \"aligned\" (the default with a cached teacher)",
        )),
        (Some(_), None) => {
            config.train.windows = Some(WindowSampling::Aligned);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Everything around the terms: parameter groups, stages, early stopping, router, schedules,
/// the teacher's vocabulary, context and taps.
fn check_objective(
    config: &RunConfig,
    ctx: &BuildContext,
    student: &dyn Student,
    terms: &[TermSlot],
    teacher: &ResolvedTeacher,
) -> Result<()> {
    let t = &config.train;
    let mut vars = student.vars();
    for slot in terms {
        let owned = slot.term.vars().into_iter();
        vars.extend(owned.map(|(n, v)| (format!("loss.{}.{n}", slot.name), v)));
    }
    assign_groups(vars.clone(), &t.param_groups, t.weight_decay, "train.param_groups")?;
    stages::check(config, terms, &vars)?;
    checks::early_stopping(t)?;
    let names: Vec<String> = terms.iter().map(|t| t.name.clone()).collect();
    build_router(config, ctx)?.check_terms(&names)?;
    stages::lr_schedule(config, ctx)?;
    stages::student_stages(config, ctx, terms)?;
    if let Some(loaded) = &teacher.loaded {
        let vocab = ctx.require_vocab("teacher")?;
        checks::model_fits("teacher", loaded.vocab_size(), loaded.context_len(), vocab, t.seq_len)?;
    }
    if let Some(model) = teacher.model() {
        terms::check_teacher_taps(terms, model)?;
    }
    if !terms.iter().any(|t| t.term.needs_teacher()) {
        tracing::warn!("no loss term reads the teacher: this run trains the student on hard labels only");
    }
    Ok(())
}

/// A fresh router of the configured kind.
fn build_router(config: &RunConfig, ctx: &BuildContext) -> Result<Box<dyn Router>> {
    ctx.registry
        .routers
        .build(&config.router.kind, &config.router.params_at("router"), ctx)
}

/// The `static` router: each term's configured weight.
fn static_router(ctx: &BuildContext) -> Result<Box<dyn Router>> {
    ctx.registry.routers.build("static", &Params::empty("router"), ctx)
}
