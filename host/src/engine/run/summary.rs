//! The run's report, from what each phase produced.

use std::time::Instant;

use crate::artifacts::report::{ModelReport, Report, RunInfo, TermReport, TrainReport};
use crate::assemble::config::ConfigOrigin;
use crate::assemble::Pipeline;

use super::session::{Session, StudentOutcome, TeacherOutcome};

/// The students a run trained after its teacher.
pub(super) struct Students {
    /// The distilled student.
    pub student: StudentOutcome,
    /// The off-policy reference of an on-policy run.
    pub off_policy: Option<StudentOutcome>,
    /// The scratch baseline.
    pub baseline: Option<StudentOutcome>,
}

/// The report of a finished run.
pub(super) fn report(
    pipeline: &Pipeline,
    origin: &ConfigOrigin,
    session: &Session,
    teacher: &TeacherOutcome,
    students: &Students,
    started: Instant,
) -> Report {
    let (student, off_policy, baseline) = (
        &students.student,
        students.off_policy.as_ref(),
        students.baseline.as_ref(),
    );
    let cfg = &pipeline.config;
    let teacher_loss = Some(teacher.eval.val_loss);
    let model_report = |s: &StudentOutcome| {
        let train = Some(TrainReport::from(&s.stats));
        ModelReport::new(s.model.describe(), s.model.num_params(), &s.eval, teacher_loss, train)
            .with_generation(s.generation)
    };
    Report {
        run: RunInfo {
            name: cfg.run.name.clone(),
            seed: cfg.run.seed,
            device: cfg.run.device.clone(),
            dir: session.dir().path().display().to_string(),
            config: origin.label(),
        },
        data: pipeline.data.describe(),
        objective: cfg
            .loss
            .iter()
            .zip(&pipeline.terms)
            .map(|(spec, slot)| TermReport {
                name: slot.name.clone(),
                kind: spec.kind.clone(),
                weight: spec.weight.clone(),
            })
            .collect(),
        teacher: ModelReport::new(
            teacher.model.describe(),
            teacher.model.num_params(),
            &teacher.eval,
            None,
            teacher.stats.as_ref().map(TrainReport::from),
        )
        .with_generation(teacher.generation),
        student: model_report(student),
        baseline: baseline.map(model_report),
        off_policy: off_policy.map(model_report),
        train: TrainReport::from(&student.stats),
        distillation_gain: baseline.map(|b| b.eval.val_loss - student.eval.val_loss),
        eval_tokens: student.eval.tokens,
        total_wall_s: started.elapsed().as_secs_f64(),
    }
}
