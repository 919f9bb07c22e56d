//! Charts of a run, drawn from its `metrics.jsonl` (and `report.json`) into `plots/*.png`:
//! training loss per phase, each distillation term, learning rate, term weights and scheduled
//! scalars (temperature, ...), and evaluation curves of teacher, student and baseline. Stage
//! boundaries are drawn as vertical lines. Text uses the embedded DejaVu Sans, so drawing needs
//! no system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

use retort_core::{fsutil, Error, Result};

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

/// The charts of a run, from its metrics records and the final report (if written).
pub fn charts_of(records: &[Value], report: Option<&Value>) -> Vec<Chart> {
    let train: Vec<&Value> = records.iter().filter(|r| r["event"] == "train").collect();
    let phases: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &train {
            if let Some(p) = r["phase"].as_str() {
                if !v.iter().any(|x| x == p) {
                    v.push(p.to_string());
                }
            }
        }
        v
    };
    let boundaries: Vec<(f64, String)> = records
        .iter()
        .filter(|r| r["event"] == "param_groups" && r["phase"] == "student")
        .filter_map(|r| Some((r["step"].as_f64()?, r["stage"].as_str()?.to_string())))
        .filter(|(step, _)| *step > 0.0)
        .collect();
    let points = |phase: &str, f: &dyn Fn(&Value) -> Option<f64>| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = train
            .iter()
            .filter(|r| r["phase"] == phase)
            .filter_map(|r| Some((r["step"].as_f64()?, f(r)?)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        // A resumed run re-logs nothing twice (metrics are truncated), but keep x strictly ordered.
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    };
    let line = |name: &str, pts: Vec<(f64, f64)>| Series {
        name: name.to_string(),
        points: pts,
        markers: false,
    };
    let mut charts = Vec::new();

    // 1. Total training loss of every phase.
    let series: Vec<Series> = phases
        .iter()
        .map(|p| line(p, points(p, &|r| r["loss"].as_f64())))
        .filter(|s| !s.points.is_empty())
        .collect();
    if !series.is_empty() {
        charts.push(Chart {
            file: "train_loss.png".into(),
            title: "Training loss (total objective) per phase".into(),
            y_label: "loss (nats/token)".into(),
            series,
            vlines: boundaries.clone(),
            hlines: Vec::new(),
        });
    }

    // 2. Each term of the student's objective, unweighted.
    let keys = |field: &str| -> Vec<String> {
        let mut ks: Vec<String> = Vec::new();
        for r in train.iter().filter(|r| r["phase"] == "student") {
            if let Some(o) = r[field].as_object() {
                for k in o.keys() {
                    if !ks.contains(k) {
                        ks.push(k.clone());
                    }
                }
            }
        }
        ks
    };
    let per_key = |field: &str, prefix: &str| -> Vec<Series> {
        keys(field)
            .into_iter()
            .map(|k| {
                let kk = k.clone();
                let f = field.to_string();
                line(
                    &format!("{prefix}{k}"),
                    points("student", &move |r| r[&f][&kk].as_f64()),
                )
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let terms = per_key("terms", "");
    if !terms.is_empty() {
        charts.push(Chart {
            file: "student_terms.png".into(),
            title: "Student: each loss term (unweighted)".into(),
            y_label: "term value".into(),
            series: terms,
            vlines: boundaries.clone(),
            hlines: Vec::new(),
        });
    }

    // 3. Learning rate of every phase.
    let lr: Vec<Series> = phases
        .iter()
        .map(|p| line(p, points(p, &|r| r["lr"].as_f64())))
        .filter(|s| !s.points.is_empty())
        .collect();
    if !lr.is_empty() {
        charts.push(Chart {
            file: "learning_rate.png".into(),
            title: "Learning rate".into(),
            y_label: "lr".into(),
            series: lr,
            vlines: boundaries.clone(),
            hlines: Vec::new(),
        });
    }

    // 4. Effective term weights and scheduled scalars (temperature, alpha, ...).
    let mut knobs = per_key("weights", "weight ");
    knobs.extend(per_key("scalars", ""));
    if !knobs.is_empty() {
        charts.push(Chart {
            file: "weights_and_schedules.png".into(),
            title: "Student: term weights (after the router) and scheduled values".into(),
            y_label: "value".into(),
            series: knobs,
            vlines: boundaries.clone(),
            hlines: Vec::new(),
        });
    }

    // 5. Evaluation: periodic val loss of each phase, the final values, the teacher's line.
    let mut evals: Vec<Series> = Vec::new();
    for p in ["student", "baseline", "teacher"] {
        let mut pts: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| (r["event"] == "eval" || r["event"] == "stage_end") && r["phase"] == p)
            .filter_map(|r| Some((r["step"].as_f64()?, r["val_loss"].as_f64()?)))
            .collect();
        if let Some(rep) = report {
            let final_loss = rep[p]["val_loss"].as_f64();
            let steps = rep[p]["train"]["steps"].as_f64();
            if let (Some(y), Some(x)) = (final_loss, steps) {
                pts.push((x, y));
            }
        }
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts.dedup_by(|a, b| a.0 == b.0);
        if !pts.is_empty() {
            evals.push(Series {
                name: p.to_string(),
                points: pts,
                markers: true,
            });
        }
    }
    let teacher_line: Vec<(f64, String)> = report
        .and_then(|r| r["teacher"]["val_loss"].as_f64())
        .map(|y| vec![(y, format!("teacher {y:.4}"))])
        .unwrap_or_default();
    if !evals.is_empty() {
        charts.push(Chart {
            file: "eval.png".into(),
            title: "Validation loss: teacher, distilled student, scratch baseline".into(),
            y_label: "val loss (nats/token)".into(),
            series: evals,
            vlines: boundaries,
            hlines: teacher_line,
        });
    }
    charts
}

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails for bytes that are not a font; these are DejaVu Sans.
        if register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_err() {
            tracing::warn!("could not register the embedded font; chart text may be missing");
        }
    });
}

fn bounds(chart: &Chart) -> Option<((f64, f64), (f64, f64))> {
    let xs = chart.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(chart.hlines.iter().map(|h| h.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    if !(x0.is_finite() && y0.is_finite()) {
        return None;
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else {
        y0.abs().max(1e-3) * 0.1
    };
    Some(((x0.min(0.0), x1), (y0 - pad, y1 + pad)))
}

/// Draws `chart` as a PNG at `path`.
pub fn draw(chart: &Chart, path: &Path) -> Result<()> {
    font();
    let Some(((x0, x1), (y0, y1))) = bounds(chart) else {
        return Ok(());
    };
    let err = |e: String| Error::Runtime(format!("drawing {}: {e}", path.display()));
    // The encoder picks the format from the extension: the temporary file ends in `.png` too.
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{}-{file}", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| err(e.to_string()))?;
        c.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(chart.y_label.as_str())
            .label_style(("sans-serif", 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (x, label) in &chart.vlines {
            let style = RGBColor(120, 120, 120).stroke_width(1);
            c.draw_series(LineSeries::new([(*x, y0), (*x, y1)], style))
                .map_err(|e| err(e.to_string()))?;
            c.draw_series(std::iter::once(Text::new(
                format!("stage {label}"),
                (*x, y1),
                ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
            )))
            .map_err(|e| err(e.to_string()))?;
        }
        for (y, label) in &chart.hlines {
            let style = RGBColor(0, 0, 0).stroke_width(1);
            c.draw_series(LineSeries::new([(x0, *y), (x1, *y)], style))
                .map_err(|e| err(e.to_string()))?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], RGBColor(0, 0, 0)));
        }
        for (i, s) in chart.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
            if s.markers {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming chart into place", path, e))
}

/// Reads `metrics.jsonl` of a run directory (lines that are not JSON are an input error).
pub fn read_records(dir: &Path) -> Result<Vec<Value>> {
    let p = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io("reading metrics", &p, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::input(format!("{}:{}", p.display(), i + 1), format!("not a JSON record: {e}")))
        })
        .collect()
}

/// Draws every chart of the run in `dir` into `dir/plots/`; returns `(title, relative path)`.
pub fn plot_run(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let records = read_records(dir)?;
    let report: Option<Value> = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let out = dir.join("plots");
    std::fs::create_dir_all(&out).map_err(|e| Error::io("creating plots directory", &out, e))?;
    let mut written = Vec::new();
    for chart in charts_of(&records, report.as_ref()) {
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
    use serde_json::json;

    fn records() -> Vec<Value> {
        let mut v = vec![
            json!({"event": "param_groups", "phase": "student", "stage": "a", "step": 0}),
            json!({"event": "param_groups", "phase": "student", "stage": "b", "step": 20}),
        ];
        for step in (5..=40).step_by(5) {
            let s = step as f64;
            v.push(json!({"event": "train", "phase": "teacher", "step": step, "loss": 4.0 - s / 20.0, "lr": 1e-2}));
            v.push(
                json!({"event": "train", "phase": "student", "step": step, "loss": 3.0 - s / 40.0,
                          "terms": {"kl": 1.0 / s, "ce": 2.0}, "weights": {"kl": 0.5, "ce": 0.5},
                          "scalars": {"kl.temperature": 2.0 - s / 40.0}, "lr": 3e-3}),
            );
        }
        v.push(json!({"event": "eval", "phase": "student", "step": 20, "val_loss": 2.6}));
        v
    }

    #[test]
    fn charts_carry_every_series_and_the_stage_boundary() {
        let report = json!({"teacher": {"val_loss": 2.0}, "student": {"val_loss": 2.4, "train": {"steps": 40}}});
        let charts = charts_of(&records(), Some(&report));
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
