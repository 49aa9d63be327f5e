//! Charts with plotters: one horizontal bar panel per (metric, unit), a bar per
//! path/mode at the median with a min–max whisker. SVG and PNG, headless: text is
//! drawn with ab_glyph from a TrueType font found on disk (DejaVu on Debian); without
//! one the bars are drawn unlabelled and the Markdown table carries the numbers.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::{fmt_num, Record, Report};

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for "sans-serif" once; true when text can be drawn.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        for path in FONT_CANDIDATES {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

const WIDTH: u32 = 1000;
const LABEL_W: i32 = 260;
const BAR_H: u32 = 26;
const PANEL_EXTRA: u32 = 70;

fn color(mode: &str) -> RGBColor {
    match mode {
        "nftables" => RGBColor(66, 133, 244),
        "iptables" => RGBColor(244, 160, 0),
        "vxlan" => RGBColor(15, 157, 88),
        "host-gw" => RGBColor(171, 71, 188),
        "kube-proxy" | "kube-proxy (FACTS.md)" => RGBColor(219, 68, 55),
        _ => RGBColor(120, 120, 120),
    }
}

/// Records grouped by (metric, unit), in first-seen order.
pub fn panels(records: &[Record]) -> Vec<(String, Vec<&Record>)> {
    let mut out: Vec<(String, Vec<&Record>)> = Vec::new();
    for r in records {
        let key = format!("{} ({})", r.metric, r.unit);
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => out.push((key, vec![r])),
        }
    }
    out
}

fn height(records: &[Record]) -> u32 {
    panels(records)
        .iter()
        .map(|(_, v)| PANEL_EXTRA + BAR_H * v.len() as u32)
        .sum::<u32>()
        + 40
}

/// Draws SUITE.svg and SUITE.png into `dir`.
pub fn draw(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if report.records.is_empty() {
        return Ok(vec![]);
    }
    let text = font_ready();
    let h = height(&report.records);
    let svg = dir.join(format!("{}.svg", report.suite));
    {
        let root = SVGBackend::new(&svg, (WIDTH, h)).into_drawing_area();
        render(&root, report, text)?;
        root.present().map_err(|e| anyhow::anyhow!("svg: {e:?}"))?;
    }
    let png = dir.join(format!("{}.png", report.suite));
    {
        let root = BitMapBackend::new(&png, (WIDTH, h)).into_drawing_area();
        render(&root, report, text)?;
        root.present().map_err(|e| anyhow::anyhow!("png: {e:?}"))?;
    }
    Ok(vec![svg, png])
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    report: &Report,
    text: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e:?}");
    root.fill(&WHITE).map_err(e)?;
    let (title, mut rest) = root.split_vertically(40);
    if text {
        title
            .draw(&Text::new(
                report.title.clone(),
                (10, 10),
                ("sans-serif", 20).into_font().color(&BLACK),
            ))
            .map_err(e)?;
    }
    for (key, recs) in panels(&report.records) {
        let ph = PANEL_EXTRA + BAR_H * recs.len() as u32;
        let (area, r) = rest.split_vertically(ph);
        rest = r;
        panel(&area, &key, &recs, &report.reference, text).map_err(e)?;
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    key: &str,
    recs: &[&Record],
    reference: &str,
    text: bool,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let n = recs.len();
    let top = recs
        .iter()
        .map(|r| r.max.max(r.median))
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max);
    let xmax = if top > 0.0 { top * 1.22 } else { 1.0 };
    let (labels, plot) = area.split_horizontally(LABEL_W);
    let mut b = ChartBuilder::on(&plot);
    b.margin_right(20).margin_top(6).x_label_area_size(22);
    if text {
        b.caption(key, ("sans-serif", 15));
    }
    let mut chart = b.build_cartesian_2d(0f64..xmax, 0f64..n as f64)?;
    {
        let mut mesh = chart.configure_mesh();
        mesh.disable_y_mesh()
            .disable_y_axis()
            .light_line_style(WHITE);
        if text {
            mesh.x_labels(6)
                .x_label_formatter(&|x| fmt_num(*x))
                .label_style(("sans-serif", 11));
        } else {
            mesh.x_labels(0);
        }
        mesh.draw()?;
    }
    for (i, r) in recs.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        // The reference path (the limit) is grey whatever mode it was measured with.
        let c = if r.path == reference {
            color("-")
        } else {
            color(&r.mode)
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.18), (r.median.max(0.0), y + 0.82)],
            c.mix(0.75).filled(),
        )))?;
        if r.runs > 1 && r.max > r.min {
            let style = BLACK.stroke_width(2);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(r.min, y + 0.5), (r.max, y + 0.5)],
                style,
            )))?;
            for x in [r.min, r.max] {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(x, y + 0.3), (x, y + 0.7)],
                    style,
                )))?;
            }
        }
        if text {
            let right = r.max.max(r.median);
            let mut v = fmt_num(r.median);
            if let Some(ratio) = r.ratio_to_direct {
                v.push_str(&format!("  (×{ratio:.2})"));
            }
            chart.draw_series(std::iter::once(Text::new(
                v,
                (right + xmax * 0.01, y + 0.72),
                ("sans-serif", 12).into_font().color(&BLACK),
            )))?;
            let (_, py) = chart.backend_coord(&(0.0, y + 0.5));
            let (_, area_y) = area.get_base_pixel();
            let label = r.label();
            labels.draw(&Text::new(
                label,
                (8, py - area_y - 7),
                ("sans-serif", 12).into_font().color(&BLACK),
            ))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;

    #[test]
    fn panels_group_by_metric_and_unit() {
        let s = Summary {
            median: 1.0,
            min: 0.5,
            max: 2.0,
            runs: 3,
        };
        let recs = vec![
            Record::new("direct", "-", "rr p50", "µs", s, "t"),
            Record::new("direct", "-", "tput", "Gbit/s", s, "t"),
            Record::new("clusterip", "nftables", "rr p50", "µs", s, "t"),
        ];
        let p = panels(&recs);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "rr p50 (µs)");
        assert_eq!(p[0].1.len(), 2);
        let dir = std::env::temp_dir().join(format!("ferry-bench-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rep = Report::new("t", "Test");
        rep.records = recs;
        let files = draw(&rep, &dir).unwrap();
        assert_eq!(files.len(), 2);
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(std::fs::metadata(&files[1]).unwrap().len() > 1000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
