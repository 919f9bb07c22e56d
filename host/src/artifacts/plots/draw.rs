//! Drawing a [`Chart`] as a PNG with plotters. Text uses the embedded DejaVu Sans, so drawing
//! needs no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use retort_core::{Error, Result};

use super::charts::Chart;

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
    let what = format!("drawing {}", path.display());
    let err = |e: DrawingAreaErrorKind<<BitMapBackend as DrawingBackend>::ErrorType>| Error::failed(what.clone(), e);
    // The encoder picks the format from the extension: the temporary file ends in `.png` too.
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{}-{file}", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        c.configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(chart.y_label.as_str())
            .label_style(("sans-serif", 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err)?;
        for (x, label) in &chart.vlines {
            let style = RGBColor(120, 120, 120).stroke_width(1);
            c.draw_series(LineSeries::new([(*x, y0), (*x, y1)], style))
                .map_err(err)?;
            c.draw_series(std::iter::once(Text::new(
                format!("stage {label}"),
                (*x, y1),
                ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
            )))
            .map_err(err)?;
        }
        for (y, label) in &chart.hlines {
            let style = RGBColor(0, 0, 0).stroke_width(1);
            c.draw_series(LineSeries::new([(x0, *y), (x1, *y)], style))
                .map_err(err)?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], RGBColor(0, 0, 0)));
        }
        for (i, s) in chart.series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            c.draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)))
                .map_err(err)?
                .label(s.name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
            if s.markers {
                c.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(err)?;
            }
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming chart into place", path, e))
}
