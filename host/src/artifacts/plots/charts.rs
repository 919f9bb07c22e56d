//! The charts of a run, from its events (and its report's final evaluations): training loss per
//! phase, each distillation term, learning rate, term weights and scheduled scalars, and the
//! evaluation curves of the distilled student and the baseline against the teacher's loss.
//! Stage boundaries of the student phase are vertical lines.

use std::collections::BTreeMap;

use crate::artifacts::events::{Event, TrainRecord};
use crate::artifacts::report::Report;

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// `(x, y)` points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Draw markers as well as the line (for sparse series such as evaluations).
    pub markers: bool,
}

/// One chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// File name under `plots/`.
    pub file: String,
    /// Title.
    pub title: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
    /// Vertical markers `(x, label)`: stage boundaries.
    pub vlines: Vec<(f64, String)>,
    /// Horizontal reference lines `(y, label)`: e.g. the teacher's val loss.
    pub hlines: Vec<(f64, String)>,
}

/// What the charts take from the report: the final evaluations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinalEvals {
    /// The teacher's validation loss.
    pub teacher: Option<f64>,
    /// `(phase, steps trained, validation loss)` of the student, the off-policy reference and
    /// the baseline.
    pub students: Vec<(String, f64, f64)>,
}

impl From<&Report> for FinalEvals {
    fn from(r: &Report) -> Self {
        let end = |who: &str, m: &crate::artifacts::report::ModelReport| {
            m.train.as_ref().map(|t| (who.to_string(), t.steps as f64, m.val_loss))
        };
        let students = [
            Some(("student", &r.student)),
            r.off_policy.as_ref().map(|o| ("offpolicy", o)),
            r.baseline.as_ref().map(|b| ("baseline", b)),
        ];
        FinalEvals {
            teacher: Some(r.teacher.val_loss),
            students: students.into_iter().flatten().filter_map(|(w, m)| end(w, m)).collect(),
        }
    }
}

/// The charts of a run.
pub fn charts_of(events: &[Event], finals: Option<&FinalEvals>) -> Vec<Chart> {
    let t = TrainSeries::new(events);
    [
        t.loss_chart(),
        t.terms_chart(),
        t.lr_chart(),
        t.knobs_chart(),
        t.samples_chart(),
        eval_chart(events, finals, &t.boundaries),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The train records of a run, by phase.
struct TrainSeries<'e> {
    train: Vec<&'e TrainRecord>,
    /// Phases in order of appearance.
    phases: Vec<String>,
    /// Where the student's stages begin (after the first).
    boundaries: Vec<(f64, String)>,
}

impl<'e> TrainSeries<'e> {
    fn new(events: &'e [Event]) -> Self {
        let train: Vec<&TrainRecord> = events
            .iter()
            .filter_map(|e| match e {
                Event::Train(t) => Some(t),
                _ => None,
            })
            .collect();
        let mut phases: Vec<String> = Vec::new();
        for r in &train {
            if !phases.contains(&r.at.phase) {
                phases.push(r.at.phase.clone());
            }
        }
        let boundaries = events
            .iter()
            .filter_map(|e| match e {
                Event::ParamGroups(g) if g.at.phase == "student" && g.at.step > 0 => {
                    Some((g.at.step as f64, g.at.stage.clone()))
                }
                _ => None,
            })
            .collect();
        TrainSeries {
            train,
            phases,
            boundaries,
        }
    }

    /// `(step, f(record))` of `phase`, finite values only, in step order, one per step (a
    /// resumed run logs nothing twice, since metrics are truncated, but keep x strictly ordered).
    fn points(&self, phase: &str, f: impl Fn(&TrainRecord) -> Option<f64>) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self
            .train
            .iter()
            .filter(|r| r.at.phase == phase)
            .filter_map(|r| Some((r.at.step as f64, f(r)?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        sort_dedup(&mut v);
        v
    }

    /// One line per phase of `f`.
    fn per_phase(&self, f: impl Fn(&TrainRecord) -> Option<f64>) -> Vec<Series> {
        let lines = self.phases.iter().map(|p| line(p, self.points(p, &f)));
        lines.filter(|s| !s.points.is_empty()).collect()
    }

    /// One line per key of the student's map `field` (`terms`, `weights`, `scalars`).
    fn per_key(&self, field: fn(&TrainRecord) -> &BTreeMap<String, f64>, prefix: &str) -> Vec<Series> {
        let mut keys: Vec<&String> = Vec::new();
        for r in self.train.iter().filter(|r| r.at.phase == "student") {
            for k in field(r).keys() {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        keys.into_iter()
            .map(|k| {
                line(
                    &format!("{prefix}{k}"),
                    self.points("student", |r| field(r).get(k).copied()),
                )
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }

    fn chart(&self, file: &str, title: &str, y_label: &str, series: Vec<Series>) -> Option<Chart> {
        (!series.is_empty()).then(|| Chart {
            file: file.into(),
            title: title.into(),
            y_label: y_label.into(),
            series,
            vlines: self.boundaries.clone(),
            hlines: Vec::new(),
        })
    }

    /// The total training loss of every phase.
    fn loss_chart(&self) -> Option<Chart> {
        let series = self.per_phase(|r| Some(r.loss));
        let title = "Training loss (total objective) per phase";
        self.chart("train_loss.png", title, "loss (nats/token)", series)
    }

    /// Each term of the student's objective, unweighted.
    fn terms_chart(&self) -> Option<Chart> {
        let series = self.per_key(|r| &r.terms, "");
        let title = "Student: each loss term (unweighted)";
        self.chart("student_terms.png", title, "term value", series)
    }

    /// The learning rate of every phase.
    fn lr_chart(&self) -> Option<Chart> {
        self.chart(
            "learning_rate.png",
            "Learning rate",
            "lr",
            self.per_phase(|r| Some(r.lr)),
        )
    }

    /// The effective term weights and the scheduled scalars (temperature, alpha, ...).
    fn knobs_chart(&self) -> Option<Chart> {
        let mut series = self.per_key(|r| &r.weights, "weight ");
        series.extend(self.per_key(|r| &r.scalars, ""));
        let title = "Student: term weights (after the router) and scheduled values";
        self.chart("weights_and_schedules.png", title, "value", series)
    }

    /// On-policy runs: the teacher's NLL of the sampled tokens and the share of step time spent
    /// sampling, per record.
    fn samples_chart(&self) -> Option<Chart> {
        let on_policy = |r: &TrainRecord| r.on_policy.clone();
        let nll = self.points("student", |r| on_policy(r)?.sample_nll);
        let share = self.points("student", |r| Some(on_policy(r)?.generation_share));
        let series: Vec<Series> = [
            line("teacher NLL of the samples (nats/token)", nll),
            line("share of step time sampling", share),
        ]
        .into_iter()
        .filter(|s| !s.points.is_empty())
        .collect();
        let title = "On-policy steps: how the teacher scores the student's samples";
        self.chart("on_policy.png", title, "value", series)
    }
}

/// The periodic and final validation losses of the student and the baseline, with the
/// teacher's as one horizontal line.
fn eval_chart(events: &[Event], finals: Option<&FinalEvals>, boundaries: &[(f64, String)]) -> Option<Chart> {
    let mut series = Vec::new();
    for phase in ["student", "offpolicy", "baseline"] {
        let mut pts: Vec<(f64, f64)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Eval(r) if r.at.phase == phase => Some((r.at.step as f64, r.result.val_loss)),
                Event::StageEnd(r) if r.at.phase == phase => Some((r.at.step as f64, r.result.val_loss)),
                _ => None,
            })
            .collect();
        let last = finals
            .into_iter()
            .flat_map(|f| &f.students)
            .filter(|(p, ..)| p == phase);
        pts.extend(last.map(|&(_, x, y)| (x, y)));
        pts.retain(|(_, y)| y.is_finite());
        sort_dedup(&mut pts);
        if !pts.is_empty() {
            series.push(Series {
                name: phase.to_string(),
                points: pts,
                markers: true,
            });
        }
    }
    let teacher = finals.and_then(|f| f.teacher);
    (!series.is_empty()).then(|| Chart {
        file: "eval.png".into(),
        title: "Validation loss: distilled student and scratch baseline against the teacher".into(),
        y_label: "val loss (nats/token)".into(),
        series,
        vlines: boundaries.to_vec(),
        hlines: teacher
            .map(|y| vec![(y, format!("teacher {y:.4}"))])
            .unwrap_or_default(),
    })
}

fn line(name: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_string(),
        points,
        markers: false,
    }
}

fn sort_dedup(v: &mut Vec<(f64, f64)>) {
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v.dedup_by(|a, b| a.0 == b.0);
}
