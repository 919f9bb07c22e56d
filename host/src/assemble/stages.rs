//! The stages of the student phase (`[[stages]]`): each owns its step budget, learning rate and
//! schedule, parameter groups, clipping, accumulation and term weights. A phase without stages
//! is one stage named `main` made of `[train]`.

use std::collections::HashSet;

use candle_core::Var;

use retort_core::config::{ParamGroupSpec, RunConfig, StageSpec, TrainSection};
use retort_core::{BuildContext, Error, Result, Scalar, Schedule};

use super::param_groups::assign_groups;
use super::terms::TermSlot;

/// One stretch of a phase with its own optimizer, learning rate and loss weights.
pub struct Stage {
    /// Name in metrics and reports.
    pub name: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Peak learning rate (number or schedule over the stage), times `lr_schedule`.
    pub lr: Scalar,
    /// Factor on the learning rate over the stage.
    pub lr_schedule: Box<dyn Schedule>,
    /// Parameter groups of the stage.
    pub param_groups: Vec<ParamGroupSpec>,
    /// Key path of `param_groups` in the config, for errors.
    pub groups_key: String,
    /// Default decoupled weight decay.
    pub weight_decay: f64,
    /// Global-norm clip (0: off).
    pub grad_clip: f64,
    /// Micro-batches per step.
    pub grad_accum: usize,
    /// Weights of the terms for this stage (`None`: each term's configured weight).
    pub weights: Option<Vec<Scalar>>,
    /// Fraction of the stage's steps on samples when the phase samples (`None`:
    /// `on_policy.lambda`).
    pub on_policy_lambda: Option<f64>,
}

impl Stage {
    /// The single stage of a phase that `[train]` describes as it is.
    pub fn whole(steps: usize, lr: Scalar, lr_schedule: Box<dyn Schedule>, train: &TrainSection) -> Stage {
        Stage {
            name: "main".into(),
            steps,
            lr,
            lr_schedule,
            param_groups: train.param_groups.clone(),
            groups_key: "train.param_groups".into(),
            weight_decay: train.weight_decay,
            grad_clip: train.grad_clip,
            grad_accum: train.grad_accum.max(1),
            weights: None,
            on_policy_lambda: None,
        }
    }
}

/// Optimizer steps of the student phase (the sum of the stages' steps, or `train.steps`).
pub fn student_steps(config: &RunConfig) -> usize {
    if config.stages.is_empty() {
        config.train.steps
    } else {
        config.stages.iter().map(|s| s.steps).sum()
    }
}

/// A fresh learning-rate schedule of `[train]`.
pub(super) fn lr_schedule(config: &RunConfig, ctx: &BuildContext) -> Result<Box<dyn Schedule>> {
    let s = &config.train.lr_schedule;
    ctx.registry
        .schedules
        .build(&s.kind, &s.params_at("train.lr_schedule"), ctx)
}

/// The student phase's stages, built fresh (schedules hold no state across phases).
pub(super) fn student_stages(config: &RunConfig, ctx: &BuildContext, terms: &[TermSlot]) -> Result<Vec<Stage>> {
    let t = &config.train;
    if config.stages.is_empty() {
        let lr = t.lr.build("train.lr", ctx)?;
        return Ok(vec![Stage::whole(t.steps, lr, lr_schedule(config, ctx)?, t)]);
    }
    let stages = config.stages.iter().enumerate();
    stages.map(|(i, st)| stage(config, ctx, terms, i, st)).collect()
}

fn stage(config: &RunConfig, ctx: &BuildContext, terms: &[TermSlot], i: usize, st: &StageSpec) -> Result<Stage> {
    let (t, key) = (&config.train, format!("stages[{i}]"));
    let lr = match &st.lr {
        Some(lr) => lr.build_positive(&format!("{key}.lr"), ctx)?,
        None => t.lr.build("train.lr", ctx)?,
    };
    let lr_schedule = match &st.lr_schedule {
        Some(s) => ctx
            .registry
            .schedules
            .build(&s.kind, &s.params_at(&format!("{key}.lr_schedule")), ctx)?,
        None => lr_schedule(config, ctx)?,
    };
    Ok(Stage {
        name: st.name_or_default(i),
        steps: st.steps,
        lr,
        lr_schedule,
        param_groups: st.param_groups.clone().unwrap_or_else(|| t.param_groups.clone()),
        groups_key: match st.param_groups {
            Some(_) => format!("{key}.param_groups"),
            None => "train.param_groups".into(),
        },
        weight_decay: st.weight_decay.unwrap_or(t.weight_decay),
        grad_clip: st.grad_clip.unwrap_or(t.grad_clip),
        grad_accum: st.grad_accum.unwrap_or(t.grad_accum).max(1),
        weights: stage_weights(config, ctx, terms, &key, st)?,
        on_policy_lambda: stage_lambda(config, &key, st)?,
    })
}

/// A stage's `on_policy_lambda`, which needs `[on_policy]` and lies in [0, 1].
fn stage_lambda(config: &RunConfig, key: &str, st: &StageSpec) -> Result<Option<f64>> {
    let Some(lambda) = st.on_policy_lambda else {
        return Ok(None);
    };
    let key = format!("{key}.on_policy_lambda");
    if config.on_policy.is_none() {
        return Err(Error::config(
            key,
            "needs an [on_policy] section (how to sample); add one, or remove the key",
        ));
    }
    if !(lambda.is_finite() && (0.0..=1.0).contains(&lambda)) {
        return Err(Error::config(
            key,
            format!("expected the fraction of the stage's steps on samples, a number in [0, 1], got {lambda}"),
        ));
    }
    Ok(Some(lambda))
}

/// The fraction of the steps on samples of each student stage: its `on_policy_lambda`, else
/// `lambda` (`on_policy.lambda`).
pub fn stage_lambdas(config: &RunConfig, lambda: f64) -> Vec<(usize, f64)> {
    if config.stages.is_empty() {
        return vec![(config.train.steps, lambda)];
    }
    let stages = config.stages.iter();
    stages
        .map(|s| (s.steps, s.on_policy_lambda.unwrap_or(lambda)))
        .collect()
}

/// A stage's `loss_weights`, each term falling back on its own weight; `None` without any.
fn stage_weights(
    config: &RunConfig,
    ctx: &BuildContext,
    terms: &[TermSlot],
    key: &str,
    st: &StageSpec,
) -> Result<Option<Vec<Scalar>>> {
    if st.loss_weights.is_empty() {
        return Ok(None);
    }
    let mut w = Vec::with_capacity(terms.len());
    for (j, slot) in terms.iter().enumerate() {
        w.push(match st.loss_weights.get(&slot.name) {
            Some(spec) => {
                let path = format!("{key}.loss_weights.{}", slot.name);
                let s = spec.build(&path, ctx)?;
                super::terms::check_weight(&s, &path, slot.term.signed_weights())?;
                s
            }
            None => config.loss[j].weight.build(&format!("loss[{j}].weight"), ctx)?,
        });
    }
    Ok(Some(w))
}

/// Every stage override valid: steps, accumulation, unique names, decay and clipping, loss
/// weights naming existing terms, parameter groups matching parameters.
pub(super) fn check(config: &RunConfig, terms: &[TermSlot], vars: &[(String, Var)]) -> Result<()> {
    let names: Vec<String> = terms.iter().map(|t| t.name.clone()).collect();
    let mut stage_names = HashSet::new();
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
        if let Some(name) = &st.name {
            super::checks::identifier(&format!("{key}.name"), name)?;
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
        if let Some(term) = st.loss_weights.keys().find(|t| !names.contains(t)) {
            return Err(Error::config(
                format!("{key}.loss_weights.{term}"),
                format!("no loss term is named `{term}`; the terms are: {}", names.join(", ")),
            ));
        }
        if let Some(groups) = &st.param_groups {
            let wd = st.weight_decay.unwrap_or(config.train.weight_decay);
            assign_groups(vars.to_vec(), groups, wd, &format!("{key}.param_groups"))?;
        }
    }
    Ok(())
}
