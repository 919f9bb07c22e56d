//! Charts of a run, drawn from its events (`metrics.jsonl`) and its `report.json` into
//! `plots/*.png`, and embedded in `report.md`.

mod charts;
mod draw;

use std::path::{Path, PathBuf};

use retort_core::{fsutil, Error, Result};

use super::events::read_events;
use super::report::Report;

pub use charts::{charts_of, Chart, FinalEvals, Series};
pub use draw::draw;

/// Draws every chart of the run in `dir` into `dir/plots/`; returns `(title, relative path)`.
pub fn plot_run(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let events = read_events(dir)?;
    let finals: Option<FinalEvals> = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Report>(&t).ok())
        .map(|r| FinalEvals::from(&r));
    let out = dir.join("plots");
    std::fs::create_dir_all(&out).map_err(|e| Error::io("creating plots directory", &out, e))?;
    let mut written = Vec::new();
    for chart in charts_of(&events, finals.as_ref()) {
        draw(&chart, &out.join(&chart.file))?;
        written.push((chart.title.clone(), PathBuf::from("plots").join(&chart.file)));
    }
    Ok(written)
}

const PLOTS_HEADING: &str = "\n## Plots\n";

/// `report.md` with its plots section replaced by one embedding `plots`.
pub fn with_plots_section(markdown: &str, plots: &[(String, PathBuf)]) -> String {
    let base = match markdown.find(PLOTS_HEADING) {
        Some(i) => &markdown[..i],
        None => markdown,
    };
    let mut s = base.trim_end().to_string();
    s.push('\n');
    if plots.is_empty() {
        return s;
    }
    s.push_str(PLOTS_HEADING);
    for (title, path) in plots {
        s.push_str(&format!("\n![{title}]({})\n", path.display()));
    }
    s
}

/// Draws the run's charts and embeds them in its `report.md` (`retort plot`, and the end of
/// `retort run`).
pub fn plot_and_embed(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let plots = plot_run(dir)?;
    let md_path = dir.join("report.md");
    if let Ok(md) = std::fs::read_to_string(&md_path) {
        fsutil::write_atomic(&md_path, with_plots_section(&md, &plots).as_bytes())?;
    }
    Ok(plots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use plotters::style::{Color, Palette, Palette99};

    use crate::artifacts::events::{At, EvalRecord, Event, ParamGroupsRecord, TrainRecord};
    use crate::artifacts::report::EvalResult;

    fn at(phase: &str, stage: &str, step: usize) -> At {
        At {
            phase: phase.into(),
            stage: stage.into(),
            step,
        }
    }

    fn map(entries: &[(&str, f64)]) -> BTreeMap<String, f64> {
        entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn train(phase: &str, step: usize, loss: f64, lr: f64, terms: &[(&str, f64)], scalars: &[(&str, f64)]) -> Event {
        let weights: Vec<(&str, f64)> = terms.iter().map(|(k, _)| (*k, 0.5)).collect();
        Event::Train(TrainRecord {
            at: at(phase, "main", step),
            loss,
            terms: map(terms),
            weights: map(&weights),
            scalars: map(scalars),
            router: BTreeMap::new(),
            lr,
            grad_norm: 1.0,
            grad_norm_groups: BTreeMap::new(),
            tokens: 0,
            tokens_per_s: 0.0,
            elapsed_s: 0.0,
            skipped_total: 0,
            on_policy: None,
        })
    }

    fn records() -> Vec<Event> {
        let groups = |stage: &str, step| {
            Event::ParamGroups(ParamGroupsRecord {
                at: at("student", stage, step),
                steps: 20,
                lr: 3e-3,
                groups: Vec::new(),
            })
        };
        let mut v = vec![groups("a", 0), groups("b", 20)];
        for step in (5..=40).step_by(5) {
            let s = step as f64;
            v.push(train("teacher", step, 4.0 - s / 20.0, 1e-2, &[], &[]));
            let terms = [("kl", 1.0 / s), ("ce", 2.0)];
            v.push(train(
                "student",
                step,
                3.0 - s / 40.0,
                3e-3,
                &terms,
                &[("kl.temperature", 2.0 - s / 40.0)],
            ));
        }
        v.push(Event::Eval(EvalRecord {
            at: at("student", "a", 20),
            result: EvalResult {
                val_loss: 2.6,
                perplexity: 2.6f64.exp(),
                tokens: 0,
                top1_agreement: None,
                kl_to_teacher: None,
            },
        }));
        v
    }

    #[test]
    fn charts_carry_every_series_and_the_stage_boundary() {
        let finals = FinalEvals {
            teacher: Some(2.0),
            students: vec![("student".into(), 40.0, 2.4)],
        };
        let charts = charts_of(&records(), Some(&finals));
        let files: Vec<&str> = charts.iter().map(|c| c.file.as_str()).collect();
        assert_eq!(
            files,
            [
                "train_loss.png",
                "student_terms.png",
                "learning_rate.png",
                "weights_and_schedules.png",
                "eval.png"
            ]
        );
        let loss = &charts[0];
        assert_eq!(loss.series.len(), 2);
        assert_eq!(loss.series[1].points.len(), 8);
        assert_eq!(loss.vlines, vec![(20.0, "b".to_string())]);
        let knobs = &charts[3];
        let names: Vec<&str> = knobs.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["weight ce", "weight kl", "kl.temperature"]);
        let eval = &charts[4];
        assert_eq!(eval.series[0].points, vec![(20.0, 2.6), (40.0, 2.4)]);
        assert_eq!(eval.hlines[0].0, 2.0);
    }

    #[test]
    fn drawn_png_has_the_lines_in_their_colors() {
        let dir = tempfile::tempdir().expect("tmp");
        let charts = charts_of(&records(), None);
        let path = dir.path().join("loss.png");
        draw(&charts[0], &path).expect("draw");
        let bytes = std::fs::read(&path).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Decode and find pixels of both series' colors.
        let decoded = image_pixels(&path);
        for i in 0..2 {
            let c = Palette99::pick(i).to_rgba();
            let want = [c.0, c.1, c.2];
            let n = decoded.iter().filter(|p| **p == want).count();
            assert!(n > 100, "series {i}: {n} pixels of its color");
        }
    }

    fn image_pixels(path: &Path) -> Vec<[u8; 3]> {
        let img = image::open(path).expect("decode").to_rgb8();
        img.pixels().map(|p| p.0).collect()
    }

    #[test]
    fn plots_section_is_replaced_not_appended() {
        let plots = vec![("Loss".to_string(), PathBuf::from("plots/train_loss.png"))];
        let once = with_plots_section("# r\n\ntext\n", &plots);
        let twice = with_plots_section(&once, &plots);
        assert_eq!(once, twice);
        assert!(once.contains("## Plots") && once.contains("![Loss](plots/train_loss.png)"));
    }
}
