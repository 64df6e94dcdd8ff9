//! `snfc plot`: the curves of one or more runs (their `metrics.jsonl`) in one PNG — validation
//! NLL in nats and bits/dim and the training loss against epoch, validation NLL against
//! wall-clock time (the paper's Fig. 5: SNF and exact overlaid), and, when logged, the
//! reconstruction error, GECO's λ and the gradient angle (Fig. 3). One colour per run, with a
//! legend of run names.

use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("{path}: cannot draw the plot: {message}")]
    Draw { path: String, message: String },
    /// Encoding or writing the PNG failed (the error names the file).
    #[error(transparent)]
    Write(#[from] crate::data::DataError),
}

/// Pixels of one panel; panels are laid out two per row.
pub const PANEL: (u32, u32) = (640, 400);

/// One run's curves, read from `DIR/metrics.jsonl`.
#[derive(Debug, Clone)]
pub struct RunCurves {
    pub name: String,
    pub epoch: Vec<f64>,
    /// Seconds since the run started, at the end of each epoch.
    pub wall: Vec<f64>,
    pub val_nll: Vec<f64>,
    pub val_bpd: Vec<f64>,
    /// The training NLL in the validation NLL's units (NaN where not logged: files written
    /// before it was).
    pub train_nll: Vec<f64>,
    pub train_bpd: Vec<f64>,
    /// The objective's data terms (`train_objective_data_terms`, `train_loss` in older files).
    pub train_objective: Vec<f64>,
    /// (epoch, value) where logged.
    pub recon: Vec<(f64, f64)>,
    pub lambda: Vec<(f64, f64)>,
    pub angle: Vec<(f64, f64)>,
}

/// Read a run directory (or a `metrics.jsonl` file itself).
pub fn read_run(path: &Path) -> Result<RunCurves, PlotError> {
    let file = if path.is_dir() {
        path.join(crate::train::METRICS)
    } else {
        path.to_path_buf()
    };
    let bad = |message: String| PlotError::Input {
        path: file.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| bad(format!("cannot read: {e}")))?;
    // A run is named by its directory, or by a metrics file's own name (`snf.jsonl` → `snf`)
    // when it is not the standard `metrics.jsonl`.
    let standard = path.file_name().is_some_and(|n| n == crate::train::METRICS);
    let name = if path.is_dir() {
        path.file_name()
    } else if standard {
        path.parent().unwrap_or(path).file_name()
    } else {
        path.file_stem()
    }
    .map(|n| n.to_string_lossy().to_string())
    .unwrap_or_else(|| path.display().to_string());
    let mut run = RunCurves {
        name,
        epoch: Vec::new(),
        wall: Vec::new(),
        val_nll: Vec::new(),
        val_bpd: Vec::new(),
        train_nll: Vec::new(),
        train_bpd: Vec::new(),
        train_objective: Vec::new(),
        recon: Vec::new(),
        lambda: Vec::new(),
        angle: Vec::new(),
    };
    let mut clock = 0.0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| bad(format!("line {}: not a JSON object: {e}", i + 1)))?;
        let num = |key: &str| -> Result<f64, PlotError> {
            v.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| bad(format!("line {}: no number `{key}`", i + 1)))
        };
        // `null` is how JSON writes a non-finite value (an epoch whose NLL overflowed): a gap
        // in the curve, not a broken file.
        let value_or_gap = |key: &str| match v.get(key) {
            Some(serde_json::Value::Null) => Ok(f64::NAN),
            _ => num(key),
        };
        let epoch = num("epoch")?;
        clock += num("seconds")?;
        run.epoch.push(epoch);
        run.wall.push(clock);
        run.val_nll.push(value_or_gap("val_nll_nats")?);
        run.val_bpd.push(value_or_gap("val_bits_per_dim")?);
        let logged_or_gap = |key: &str| match v.get(key) {
            None => Ok(f64::NAN),
            Some(_) => value_or_gap(key),
        };
        run.train_nll.push(logged_or_gap("train_nll_nats")?);
        run.train_bpd.push(logged_or_gap("train_bits_per_dim")?);
        run.train_objective
            .push(match v.get("train_objective_data_terms") {
                Some(_) => value_or_gap("train_objective_data_terms")?,
                None => value_or_gap("train_loss")?,
            });
        if let Some(r) = v.get("val_recon").and_then(serde_json::Value::as_f64) {
            run.recon.push((epoch, r));
        }
        if let Some(l) = v.get("lambda").and_then(serde_json::Value::as_object) {
            // The mean λ over the self-normalizing layers.
            let vals: Vec<f64> = l.values().filter_map(serde_json::Value::as_f64).collect();
            if !vals.is_empty() {
                run.lambda
                    .push((epoch, vals.iter().sum::<f64>() / vals.len() as f64));
            }
        }
        if let Some(a) = v
            .get("grad_angle_deg")
            .and_then(|a| a.get("mean"))
            .and_then(serde_json::Value::as_f64)
        {
            run.angle.push((epoch, a));
        }
    }
    if run.epoch.is_empty() {
        return Err(bad("has no epochs to plot".into()));
    }
    Ok(run)
}

/// A panel drawn only when some run logged it: title, y axis, the series, log scale.
type OptionalPanel = (
    &'static str,
    &'static str,
    fn(&RunCurves) -> &Vec<(f64, f64)>,
    bool,
);

/// One (x, y) series per run.
type Series = Vec<Vec<(f64, f64)>>;

/// One panel: a title, axis names and one (x, y) series per run.
struct Panel {
    title: &'static str,
    x: &'static str,
    y: &'static str,
    series: Series,
    /// A second series per run, drawn dashed in the run's colour (the training NLL beside the
    /// validation NLL), with this word after the run's name in the legend.
    dashed: Option<(&'static str, Series)>,
    log_y: bool,
}

fn panels(runs: &[RunCurves]) -> Vec<Panel> {
    let zip = |a: &[f64], b: &[f64]| a.iter().copied().zip(b.iter().copied()).collect::<Vec<_>>();
    let training = |get: fn(&RunCurves) -> &Vec<f64>| {
        let series: Vec<Vec<(f64, f64)>> = runs
            .iter()
            .map(|r| {
                zip(&r.epoch, get(r))
                    .into_iter()
                    .filter(|p| !p.1.is_nan())
                    .collect()
            })
            .collect();
        series
            .iter()
            .any(|s| !s.is_empty())
            .then_some(("train", series))
    };
    let mut out = vec![
        Panel {
            title: "NLL: validation (solid) and training (dashed)",
            x: "epoch",
            y: "nats",
            series: runs.iter().map(|r| zip(&r.epoch, &r.val_nll)).collect(),
            dashed: training(|r| &r.train_nll),
            log_y: false,
        },
        Panel {
            title: "Validation NLL vs wall-clock time",
            x: "seconds",
            y: "nats",
            series: runs.iter().map(|r| zip(&r.wall, &r.val_nll)).collect(),
            dashed: None,
            log_y: false,
        },
        Panel {
            title: "NLL: validation (solid) and training (dashed)",
            x: "epoch",
            y: "bits/dim",
            series: runs.iter().map(|r| zip(&r.epoch, &r.val_bpd)).collect(),
            dashed: training(|r| &r.train_bpd),
            log_y: false,
        },
        Panel {
            title: "Training objective without the log-dets",
            x: "epoch",
            y: "nats",
            series: runs
                .iter()
                .map(|r| zip(&r.epoch, &r.train_objective))
                .collect(),
            dashed: None,
            // It includes λ·recon, which a GECO λ can grow by orders of magnitude.
            log_y: runs
                .iter()
                .all(|r| r.train_objective.iter().all(|v| *v > 0.0)),
        },
    ];
    let optional: [OptionalPanel; 3] = [
        (
            "Reconstruction error (validation)",
            "Σ‖RWh − h‖²",
            |r| &r.recon,
            true,
        ),
        ("GECO λ (mean over layers)", "λ", |r| &r.lambda, true),
        (
            "Gradient angle, SNF vs exact",
            "degrees",
            |r| &r.angle,
            true,
        ),
    ];
    for (title, y, get, log_y) in optional {
        if runs.iter().any(|r| !get(r).is_empty()) {
            out.push(Panel {
                title,
                x: "epoch",
                y,
                series: runs.iter().map(|r| get(r).clone()).collect(),
                dashed: None,
                log_y,
            });
        }
    }
    out
}

/// The y range of a panel: from the smallest value to the 97th percentile of the values after
/// the first tenth of each series (the first epochs' NLL dwarfs the rest, and one run that
/// blows up must not flatten the others), padded by 5 %.
fn y_range(series: &[Vec<(f64, f64)>], log_y: bool) -> Option<(f64, f64)> {
    let finite = |v: f64| v.is_finite() && (!log_y || v > 0.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.1))
        .filter(|v| finite(*v))
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let mut later: Vec<f64> = series
        .iter()
        .flat_map(|s| s.iter().skip(s.len() / 10).map(|p| p.1))
        .filter(|v| finite(*v))
        .collect();
    later.sort_by(|a, b| a.total_cmp(b));
    // A log axis shows outliers without flattening the rest: keep its maximum.
    let q = if log_y { 1.0 } else { 0.97 };
    let hi = match later.len() {
        0 => f64::NEG_INFINITY,
        n => later[((n - 1) as f64 * q).round() as usize],
    };
    if !lo.is_finite() || !hi.is_finite() {
        return None;
    }
    Some(if log_y {
        let (a, b) = (lo.log10(), hi.log10().max(lo.log10() + 1e-3));
        (
            10f64.powf(a - 0.05 * (b - a)),
            10f64.powf(b + 0.05 * (b - a)),
        )
    } else {
        // One value (a one-epoch run) or a flat series: a span of 1 % of the value around it,
        // so the axis has room and its ticks something to tell apart.
        let pad = ((hi - lo) * 0.05).max(hi.abs().max(lo.abs()).max(1e-12) * 5e-3);
        (lo - pad, hi + pad)
    })
}

/// An axis number that tells ticks about `span / 10` apart from each other: [`short_number`]
/// where its digits suffice, else as many decimals (or digits of the mantissa) as the ticks'
/// spacing needs, so that no two ticks of a narrow range read the same.
fn axis_label(v: f64, span: f64) -> String {
    let a = v.abs();
    let step = span.abs() / 10.0;
    if a == 0.0 || step.is_nan() || step <= 0.0 || !step.is_finite() {
        return short_number(v);
    }
    let step_exponent = step.log10().floor() as i32;
    if (1e-2..1e5).contains(&a) {
        let decimals = (-step_exponent).max(0) as usize;
        let shown = if a >= 100.0 { 0 } else { 2 };
        if decimals <= shown {
            return short_number(v);
        }
        let s = format!("{v:.decimals$}", decimals = decimals.min(12));
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let mantissa = (a.log10().floor() as i32 - step_exponent).clamp(1, 12) as usize;
        format!("{v:.mantissa$e}")
    }
}

/// The maximal runs of consecutive points of `s` with a finite y in `[lo, hi]`.
fn segments(s: &[(f64, f64)], lo: f64, hi: f64) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for &p in s {
        if p.1.is_finite() && p.1 >= lo && p.1 <= hi {
            current.push(p);
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Axis numbers that stay short: plain with at most two decimals in [0.01, 10⁵), else in
/// scientific notation.
fn short_number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The image size for `panels` panels.
pub fn image_size(panels: usize) -> (u32, u32) {
    (2 * PANEL.0, panels.div_ceil(2) as u32 * PANEL.1)
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded font always parses; a failure would only lose the text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draw `runs` into a PNG at `out`; returns the image size.
pub fn plot(runs: &[RunCurves], out: &Path) -> Result<(u32, u32), PlotError> {
    register_font();
    let draw_err = |e: String| PlotError::Draw {
        path: out.display().to_string(),
        message: e,
    };
    let panels = panels(runs);
    let (w, h) = image_size(panels.len());
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let areas = root.split_evenly((panels.len().div_ceil(2), 2));
        for (panel, area) in panels.iter().zip(&areas) {
            draw_panel(panel, area, runs).map_err(|e| draw_err(e.to_string()))?;
        }
        root.present().map_err(|e| draw_err(e.to_string()))?;
    }
    write_png(&rgb, (w, h), out)
}

/// Write an RGB buffer as PNG; returns the size.
fn write_png(rgb: &[u8], (w, h): (u32, u32), out: &Path) -> Result<(u32, u32), PlotError> {
    crate::image::write_png(out, rgb, (w, h), 3)?;
    Ok((w, h))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(
    panel: &Panel,
    area: &Area,
    runs: &[RunCurves],
) -> Result<(), Box<dyn std::error::Error>> {
    let x_hi = panel
        .series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.0))
        .fold(0.0f64, f64::max)
        .max(1.0);
    let x_lo = panel
        .series
        .iter()
        .flat_map(|s| s.iter().map(|p| p.0))
        .fold(f64::INFINITY, f64::min)
        .min(x_hi - 1.0);
    // The axes fit both the solid and the dashed curves.
    let both: Vec<Vec<(f64, f64)>> = panel
        .series
        .iter()
        .chain(panel.dashed.iter().flat_map(|(_, d)| d))
        .cloned()
        .collect();
    // A log axis only where the values span a decade: within one it has no labelled ticks.
    let log_y = panel.log_y && y_range(&both, true).is_some_and(|(lo, hi)| hi >= 10.0 * lo);
    let Some((y_lo, y_hi)) = y_range(&both, log_y) else {
        area.titled(panel.title, ("sans-serif", 18))?;
        return Ok(());
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(panel.title, ("sans-serif", 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(70);
    // The runs of consecutive points inside the y range: a point above it (the first
    // epochs' NLL) or not finite breaks the line instead of being drawn clamped to the edge.
    let series_of = |s: &Vec<(f64, f64)>| -> Vec<Vec<(f64, f64)>> { segments(s, y_lo, y_hi) };
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(panel.x)
                .y_desc(panel.y)
                .x_label_formatter(&|v| axis_label(*v, x_hi - x_lo))
                .y_label_formatter(&|v| axis_label(*v, y_hi - y_lo))
                .label_style(("sans-serif", 13))
                .draw()?;
            for (i, (s, run)) in panel.series.iter().zip(runs).enumerate() {
                let color = COLORS[i % COLORS.len()];
                let mut pieces = series_of(s).into_iter();
                let Some(first) = pieces.next() else {
                    // Not logged by this run (or never inside the range): no line, no legend.
                    continue;
                };
                // A point with no neighbour in its piece (a one-epoch run) is drawn as a marker:
                // a line through one point draws nothing.
                let markers = |piece: &[(f64, f64)]| {
                    let lone = if piece.len() == 1 {
                        piece.to_vec()
                    } else {
                        Vec::new()
                    };
                    lone.into_iter()
                        .map(move |p| Circle::new(p, 4, color.filled()))
                };
                chart.draw_series(markers(&first))?;
                chart
                    .draw_series(LineSeries::new(first, color.stroke_width(2)))?
                    .label(run.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                for piece in pieces {
                    chart.draw_series(markers(&piece))?;
                    chart.draw_series(LineSeries::new(piece, color.stroke_width(2)))?;
                }
            }
            if let Some((word, dashed)) = &panel.dashed {
                for (i, (s, run)) in dashed.iter().zip(runs).enumerate() {
                    let color = COLORS[i % COLORS.len()];
                    for (k, piece) in series_of(s).into_iter().enumerate() {
                        let style = color.stroke_width(1);
                        let drawn = chart.draw_series(DashedLineSeries::new(piece, 6, 4, style))?;
                        if k == 0 {
                            drawn
                                .label(format!("{} ({word})", run.name))
                                .legend(move |(x, y)| {
                                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 4, 3, style)
                                });
                        }
                    }
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()?;
        }};
    }
    if log_y {
        finish!(builder.build_cartesian_2d(x_lo..x_hi, (y_lo..y_hi).log_scale())?);
    } else {
        finish!(builder.build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?);
    }
    Ok(())
}

/// `snfc plot DIR…`: read every run and draw them.
pub fn plot_runs(dirs: &[PathBuf], out: &Path) -> Result<(u32, u32), PlotError> {
    if dirs.is_empty() {
        return Err(PlotError::Input {
            path: out.display().to_string(),
            message: "no run directories to plot".into(),
        });
    }
    let runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    plot(&runs, out)
}

/// The scaling benchmark's log-log picture (the paper's Fig. 4): step time against input
/// dimension, self-normalizing and exact.
pub fn plot_scaling(
    rows: &[crate::bench::ScalingRow],
    title: &str,
    out: &Path,
) -> Result<(u32, u32), PlotError> {
    register_font();
    let draw_err = |e: String| PlotError::Draw {
        path: out.display().to_string(),
        message: e,
    };
    if rows.is_empty() {
        return Err(draw_err("no sizes to plot".into()));
    }
    let (w, h) = PANEL;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error>> {
            let xs = rows.iter().map(|r| r.dim as f64);
            let (x_lo, x_hi) = (
                xs.clone().fold(f64::INFINITY, f64::min) / 1.2,
                xs.fold(0.0, f64::max) * 1.2,
            );
            let ys = rows.iter().flat_map(|r| [r.snf_ms, r.exact_ms]);
            let (y_lo, y_hi) = (
                ys.clone().fold(f64::INFINITY, f64::min) / 1.5,
                ys.fold(0.0, f64::max) * 1.5,
            );
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("input dimension D")
                .y_desc("ms per training step")
                .x_label_formatter(&|v| short_number(*v))
                .y_label_formatter(&|v| short_number(*v))
                .label_style(("sans-serif", 13))
                .draw()?;
            type Line = (&'static str, RGBColor, fn(&crate::bench::ScalingRow) -> f64);
            let lines: [Line; 2] = [
                ("self-normalizing", COLORS[0], |r| r.snf_ms),
                ("exact", COLORS[1], |r| r.exact_ms),
            ];
            for (name, color, get) in lines {
                let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.dim as f64, get(r))).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| draw_err(e.to_string()))?;
    }
    write_png(&rgb, (w, h), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_numbers_stay_short() {
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(2.5), "2.5");
        assert_eq!(short_number(1088.3), "1088");
        assert_eq!(short_number(1.5e27), "1.5e27");
        assert_eq!(short_number(0.001), "1.0e-3");
    }

    /// A non-finite epoch (written as `null`) is a gap; a missing or non-numeric field is an
    /// error naming the line.
    #[test]
    fn null_values_are_gaps_and_missing_ones_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("metrics.jsonl");
        let line = |e: usize, nll: &str| {
            format!(
                "{{\"epoch\": {e}, \"seconds\": 1.0, \"val_nll_nats\": {nll}, \
                 \"val_bits_per_dim\": {nll}, \"train_loss\": {nll}}}\n"
            )
        };
        std::fs::write(&f, line(1, "900.0") + &line(2, "null") + &line(3, "880.0")).unwrap();
        let run = read_run(&f).unwrap();
        assert_eq!(run.epoch, [1.0, 2.0, 3.0]);
        // Named by its directory (a `metrics.jsonl`) or by its own name otherwise.
        let dir_name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        assert_eq!(run.name, dir_name);
        let other = dir.path().join("snf.jsonl");
        std::fs::copy(&f, &other).unwrap();
        assert_eq!(read_run(&other).unwrap().name, "snf");
        assert!(run.val_nll[1].is_nan() && run.val_nll[2] == 880.0);
        let out = dir.path().join("c.png");
        plot(&[run], &out).unwrap();
        assert!(out.exists());
        std::fs::write(&f, line(1, "900.0") + "{\"epoch\": 2, \"seconds\": 1.0}\n").unwrap();
        let e = read_run(&f).unwrap_err().to_string();
        assert!(e.contains("line 2: no number `val_nll_nats`"), "{e}");
    }

    #[test]
    fn points_outside_the_range_break_the_line() {
        let s = [
            (1.0, 5000.0),
            (2.0, 900.0),
            (3.0, f64::NAN),
            (4.0, 880.0),
            (5.0, 870.0),
            (6.0, 1e9),
        ];
        assert_eq!(
            segments(&s, 800.0, 1000.0),
            vec![vec![(2.0, 900.0)], vec![(4.0, 880.0), (5.0, 870.0)]]
        );
        assert!(segments(&s[..1], 800.0, 1000.0).is_empty());
    }

    /// Ticks of any range read differently: a one-epoch run's y range (one value, 1865.49)
    /// and narrow ranges at every magnitude.
    #[test]
    fn axis_labels_are_distinct_at_any_range() {
        let one_point = y_range(&[vec![(1.0, 1865.49)]], false).unwrap();
        assert!(one_point.0 < 1865.49 && one_point.1 > 1865.49);
        for (lo, hi) in [
            one_point,
            (1865.40, 1865.60),
            (0.5, 0.5001),
            (2.0e6, 2.0001e6),
            (1e-4, 1.001e-4),
            (-3.0, 3.0),
            (0.0, 1e9),
        ] {
            let span = hi - lo;
            let labels: Vec<String> = (0..=10)
                .map(|k| axis_label(lo + span * k as f64 / 10.0, span))
                .collect();
            let mut unique = labels.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), labels.len(), "{lo}..{hi}: {labels:?}");
        }
        // Wide ranges keep the short form.
        assert_eq!(axis_label(1088.3, 1000.0), "1088");
        assert_eq!(axis_label(2.5, 10.0), "2.5");
    }

    /// A one-epoch run is drawn: its single point is a marker in the run's colour.
    #[test]
    fn a_one_epoch_run_is_drawn_as_markers() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("metrics.jsonl");
        std::fs::write(
            &f,
            "{\"epoch\": 1, \"seconds\": 1.0, \"val_nll_nats\": 1865.49, \
             \"val_bits_per_dim\": 3.43, \"train_loss\": 1700.0}\n",
        )
        .unwrap();
        let out = dir.path().join("one.png");
        let (w, h) = plot(&[read_run(&f).unwrap()], &out).unwrap();
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        let c = COLORS[0];
        let colored = buf[..info.buffer_size()]
            .chunks(3)
            .filter(|p| p == &[c.0, c.1, c.2])
            .count();
        // The legends' short lines alone are 240 pixels of the run's colour here; the four
        // panels' filled markers (radius 4) add about 48 each.
        assert!(colored > 340, "{colored} pixels of the run's colour");
    }

    #[test]
    fn one_exploding_series_does_not_set_the_range() {
        let calm: Vec<(f64, f64)> = (0..100).map(|i| (i as f64, 1000.0 - i as f64)).collect();
        let wild: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, if i > 97 { 1e27 } else { 990.0 - i as f64 }))
            .collect();
        let (lo, hi) = y_range(&[calm, wild], false).unwrap();
        assert!(lo < 900.0 && hi < 1100.0, "{lo} {hi}");
    }
}
