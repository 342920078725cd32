//! PNG charts of the startup and density benchmarks (plotters, bitmap
//! backend; text in DejaVu Sans from Debian's fonts-dejavu-core).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::density::Density;
use super::stats::{stage_names, Series};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the font once for plotters' "sans-serif".
fn font() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| {
            format!("charts need a TrueType font: {FONT}: {e} (apt-get install fonts-dejavu-core)")
        })?;
        // plotters keeps a 'static reference: the font lives as long as the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT}: not a font plotters can read"))
    })
    .clone()
}

fn err<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

type Chart<'a> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// What both charts share: a 1200x700 white PNG at `path` with `title`,
/// axes from 0 to `x_end` and to `y_top`, the series `draw` puts on them,
/// and their legend at `legend`.
fn plot(
    path: &Path,
    title: &str,
    x_end: f64,
    y_top: f64,
    legend: SeriesLabelPosition,
    draw: impl FnOnce(&mut Chart<'_>, &DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
) -> Result<(), String> {
    font()?;
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_end, 0f64..y_top)
        .map_err(err(path))?;
    draw(&mut chart, &root)?;
    chart
        .configure_series_labels()
        .position(legend)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err(path))?;
    root.present().map_err(err(path))
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A stacked bar per runtime: its stages' medians, in seconds.
pub fn startup(series: &[Series], title: &str, path: &Path) -> Result<(), String> {
    let stages = stage_names(series);
    let bars: Vec<Vec<(usize, f64)>> = series
        .iter()
        .map(|s| {
            (0..s.stages.len())
                .map(|i| {
                    let k = stages.iter().position(|x| *x == s.stages[i]).unwrap_or(0);
                    let m = s.stage(i).median / 1e3;
                    (k, if m.is_nan() { 0.0 } else { m })
                })
                .collect()
        })
        .collect();
    let top = bars
        .iter()
        .map(|b| b.iter().map(|(_, v)| v).sum::<f64>())
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.15;
    let names: Vec<String> = series.iter().map(|s| s.name.clone()).collect();
    let x_end = series.len() as f64;
    plot(
        path,
        title,
        x_end,
        top,
        SeriesLabelPosition::UpperRight,
        |chart, root| {
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(series.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = (*x - 0.5).round();
                    if (x - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                        names.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc("seconds (each stage's median, stacked)")
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(err(path))?;
            for (k, name) in stages.iter().enumerate() {
                let color = COLORS[k % COLORS.len()];
                let mut rects = Vec::new();
                for (b, bar) in bars.iter().enumerate() {
                    let below: f64 = bar
                        .iter()
                        .take_while(|(kk, _)| *kk != k)
                        .map(|(_, v)| v)
                        .sum();
                    if let Some((_, v)) = bar.iter().find(|(kk, _)| *kk == k) {
                        let x0 = b as f64 + 0.2;
                        rects.push(Rectangle::new(
                            [(x0, below), (x0 + 0.6, below + v)],
                            color.filled(),
                        ));
                    }
                }
                chart
                    .draw_series(rects)
                    .map_err(err(path))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                    });
            }
            // Each bar's total above it: the short bars (runc, the native
            // agent) are invisible at the VMs' scale.
            let label = ("sans-serif", 15)
                .into_font()
                .into_text_style(root)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(bars.iter().enumerate().map(|(b, bar)| {
                    let total: f64 = bar.iter().map(|(_, v)| v).sum();
                    Text::new(
                        format!("{total:.3} s"),
                        (b as f64 + 0.5, total + top * 0.01),
                        label.clone(),
                    )
                }))
                .map_err(err(path))?;
            Ok(())
        },
    )
}

/// Host memory (sum of PSS) against the number of running containers,
/// one line per runtime.
pub fn density(d: &Density, title: &str, path: &Path) -> Result<(), String> {
    let top = d
        .curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.15;
    let x_end = d.count as f64;
    plot(
        path,
        title,
        x_end,
        top,
        SeriesLabelPosition::UpperLeft,
        |chart, _| {
            chart
                .configure_mesh()
                .x_desc("running containers")
                .y_desc("host memory, sum of PSS (MiB)")
                .x_labels(d.count.min(20) + 1)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(err(path))?;
            for (k, c) in d.curves.iter().enumerate() {
                let color = COLORS[k % COLORS.len()];
                let pts: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
                    .chain(c.points.iter().map(|&(n, p)| (n as f64, p)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(3)))
                    .map_err(err(path))?
                    .label(c.name.as_str())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], color.stroke_width(3))
                    });
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                    .map_err(err(path))?;
            }
            Ok(())
        },
    )
}
