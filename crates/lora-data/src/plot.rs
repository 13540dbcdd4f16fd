//! SVG plots of training curves and confusion matrices (plotters' SVG
//! backend). Text is written as SVG `<text>` elements, so no system fonts are
//! needed; the viewer picks a sans-serif font. Files are written atomically.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{DataError, Result};
use crate::fsutil::write_atomic;

/// A named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

/// Line colours (matplotlib's tab10).
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

const FONT: &str = "sans-serif";

/// Draws the series on one chart (title, axis names, legend) into `path`.
/// Non-finite points (a NaN loss) are left out.
pub fn plot_curves(path: &Path, title: &str, series: &[Series], x_label: &str, y_label: &str) -> Result<()> {
    let svg = render(path, (800, 500), |root| draw_panel(root, title, series, x_label, y_label, false))?;
    save(path, &svg)
}

/// Training loss by step on top and validation metrics by step below (the
/// lower panel is left out when `valid` is empty).
pub fn plot_training(path: &Path, loss: &[(f64, f64)], valid: &[Series]) -> Result<()> {
    let loss_series = [("train loss".to_string(), loss.to_vec())];
    let height = if valid.is_empty() { 450 } else { 800 };
    let svg = render(path, (800, height), |root| {
        if valid.is_empty() {
            return draw_panel(root, "training loss", &loss_series, "step", "loss", false);
        }
        let (top, bottom) = root.split_vertically(height / 2);
        draw_panel(&top, "training loss", &loss_series, "step", "loss", false)?;
        draw_panel(&bottom, "validation", valid, "step", "metric", true)
    })?;
    save(path, &svg)
}

/// Draws a confusion matrix as a heatmap: rows are true classes, columns
/// predicted ones; each cell shows its count, coloured by its share of the
/// row (so rare classes are as visible as common ones).
pub fn plot_confusion(path: &Path, labels: &[String], confusion: &[Vec<u64>], title: &str) -> Result<()> {
    check_confusion(labels, confusion)?;
    let layout = HeatLayout::new(labels, title);
    let svg = render(path, (layout.width, layout.height), |root| {
        draw_confusion(root, &layout, labels, confusion, title)
    })?;
    save(path, &svg)
}

/// Errors unless `confusion` is a square matrix with one row per label.
fn check_confusion(labels: &[String], confusion: &[Vec<u64>]) -> Result<()> {
    if labels.is_empty() {
        return Err(DataError::BadConfusion("no labels".into()));
    }
    if confusion.len() != labels.len() {
        return Err(DataError::BadConfusion(format!(
            "{} rows for {} labels",
            confusion.len(),
            labels.len()
        )));
    }
    if let Some((i, row)) = confusion.iter().enumerate().find(|(_, r)| r.len() != labels.len()) {
        return Err(DataError::BadConfusion(format!(
            "row {i} ('{}') has {} columns for {} labels",
            labels[i],
            row.len(),
            labels.len()
        )));
    }
    Ok(())
}

type DrawResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;
type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Renders a `size` SVG with `draw` into a string.
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let result = root.fill(&WHITE).and_then(|_| draw(&root)).and_then(|_| root.present());
        result.map_err(|e| DataError::Plot {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    Ok(svg)
}

fn save(path: &Path, svg: &str) -> Result<()> {
    write_atomic(path, svg.as_bytes()).map_err(|e| DataError::io(path, e))
}

/// The x and y ranges covering every finite point, padded; (0..1, 0..1) when
/// there is none.
fn bounds(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let pts = series.iter().flat_map(|(_, p)| p).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let widen = |lo: f64, hi: f64| -> (f64, f64) {
        if hi > lo {
            let pad = (hi - lo) * 0.05;
            (lo - pad, hi + pad)
        } else {
            let pad = (lo.abs() * 0.1).max(0.5);
            (lo - pad, hi + pad)
        }
    };
    let (x0, x1) = if x1 > x0 {
        let pad = (x1 - x0) * 0.02;
        (x0 - pad, x1 + pad)
    } else {
        widen(x0, x1)
    };
    ((x0, x1), widen(y0, y1))
}

/// One line chart with a caption, axis names and (for several series or
/// `markers`) a legend; `markers` also draws a dot on every point.
fn draw_panel(
    area: &Area<'_>,
    title: &str,
    series: &[Series],
    x_label: &str,
    y_label: &str,
    markers: bool,
) -> DrawResult {
    let ((x0, x1), (y0, y1)) = bounds(series);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    let tick = |v: &f64| {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{v:.0}")
        } else {
            format!("{}", (v * 1e6).round() / 1e6)
        }
    };
    chart
        .configure_mesh()
        .light_line_style(BLACK.mix(0.03))
        .bold_line_style(BLACK.mix(0.12))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .x_desc(x_label)
        .y_desc(y_label)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 12))
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let finite: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let line = LineSeries::new(finite, color.stroke_width(2));
        let line = if markers { line.point_size(3) } else { line };
        chart
            .draw_series(line)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if series.len() > 1 || markers {
        chart
            .configure_series_labels()
            .position(legend_position(series, (y0, y1)))
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

/// Lower right when the series end in the upper half of the chart (rising
/// metrics), upper right otherwise (falling losses), so the legend rarely
/// covers the latest points.
fn legend_position(series: &[Series], (y0, y1): (f64, f64)) -> SeriesLabelPosition {
    let ends: Vec<f64> = series
        .iter()
        .filter_map(|(_, p)| p.iter().rev().find(|(x, y)| x.is_finite() && y.is_finite()))
        .map(|&(_, y)| y)
        .collect();
    let mid = (y0 + y1) / 2.0;
    if !ends.is_empty() && ends.iter().sum::<f64>() / ends.len() as f64 > mid {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// Pixel layout of a confusion heatmap.
struct HeatLayout {
    width: u32,
    height: u32,
    left: i32,
    top: i32,
    cell: i32,
    /// Column labels are written vertically when they do not fit a cell.
    rotate: bool,
}

/// Rough width in pixels of `n` characters at the label font (plotters
/// writes size 13 as about 10.5 px).
fn text_px(n: usize) -> i32 {
    (n as i32) * 13 / 2
}

impl HeatLayout {
    fn new(labels: &[String], title: &str) -> Self {
        let n = labels.len() as i32;
        let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1);
        let cell = (560 / n.max(1)).clamp(26, 90);
        let rotate = text_px(longest) > cell - 6;
        let left = 40 + text_px(longest) + 12;
        let top = 70;
        let grid = n * cell;
        let bottom = 45 + if rotate { text_px(longest) + 10 } else { 24 };
        let width = (left + grid + 30).max(text_px(title.chars().count()) * 5 / 4 + 40);
        HeatLayout {
            width: width as u32,
            height: (top + grid + bottom) as u32,
            left,
            top,
            cell,
            rotate,
        }
    }
}

/// Colour of a cell holding `share` (0..=1) of its row: white to dark blue.
fn heat_color(share: f64) -> RGBColor {
    let (lo, hi) = ((247.0, 251.0, 255.0), (8.0, 48.0, 107.0));
    let t = share.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(mix(lo.0, hi.0), mix(lo.1, hi.1), mix(lo.2, hi.2))
}

fn draw_confusion(
    root: &Area<'_>,
    l: &HeatLayout,
    labels: &[String],
    confusion: &[Vec<u64>],
    title: &str,
) -> DrawResult {
    let center = Pos::new(HPos::Center, VPos::Center);
    let text = |size: u32, color: &RGBColor| (FONT, size).into_font().color(color).pos(center);
    let label_style = (FONT, 13).into_font().color(&BLACK);
    let mid_x = l.width as i32 / 2;
    root.draw(&Text::new(title.to_string(), (mid_x, 22), text(20, &BLACK)))?;
    root.draw(&Text::new(
        "colour: share of the true class (row); numbers: counts".to_string(),
        (mid_x, 48),
        text(12, &RGBColor(90, 90, 90)),
    ))?;

    let n = labels.len() as i32;
    let count_size = (l.cell / 3).clamp(9, 18) as u32;
    let pct_size = (count_size * 3 / 4).max(8);
    for (i, row) in confusion.iter().enumerate() {
        let total: u64 = row.iter().sum();
        for (j, &count) in row.iter().enumerate() {
            let share = if total == 0 { 0.0 } else { count as f64 / total as f64 };
            let (x, y) = (l.left + j as i32 * l.cell, l.top + i as i32 * l.cell);
            let fill = heat_color(share);
            root.draw(&Rectangle::new([(x, y), (x + l.cell, y + l.cell)], fill.filled()))?;
            root.draw(&Rectangle::new([(x, y), (x + l.cell, y + l.cell)], WHITE.stroke_width(1)))?;
            let ink = if share > 0.5 { WHITE } else { BLACK };
            let (cx, cy) = (x + l.cell / 2, y + l.cell / 2);
            if l.cell >= 48 && total > 0 {
                root.draw(&Text::new(count.to_string(), (cx, cy - l.cell / 8), text(count_size, &ink)))?;
                let pct = format!("{:.0}%", share * 100.0);
                root.draw(&Text::new(pct, (cx, cy + l.cell / 5), text(pct_size, &ink)))?;
            } else {
                root.draw(&Text::new(count.to_string(), (cx, cy), text(count_size, &ink)))?;
            }
        }
    }
    let grid = n * l.cell;
    root.draw(&Rectangle::new([(l.left, l.top), (l.left + grid, l.top + grid)], BLACK.stroke_width(1)))?;

    // Row labels (true classes), right-aligned left of the grid.
    let right = label_style.clone().pos(Pos::new(HPos::Right, VPos::Center));
    for (i, name) in labels.iter().enumerate() {
        let y = l.top + i as i32 * l.cell + l.cell / 2;
        root.draw(&Text::new(name.clone(), (l.left - 8, y), right.clone()))?;
    }
    // Column labels (predicted classes) under the grid.
    let below = l.top + grid + 6;
    for (j, name) in labels.iter().enumerate() {
        let x = l.left + j as i32 * l.cell + l.cell / 2;
        let style = if l.rotate {
            label_style
                .clone()
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center))
        } else {
            label_style.clone().pos(Pos::new(HPos::Center, VPos::Top))
        };
        root.draw(&Text::new(name.clone(), (x, below), style))?;
    }
    // Axis names.
    let axis = text(15, &BLACK);
    let bottom_axis_y = l.height as i32 - 20;
    root.draw(&Text::new("predicted".to_string(), (l.left + grid / 2, bottom_axis_y), axis.clone()))?;
    root.draw(&Text::new(
        "true".to_string(),
        (16, l.top + grid / 2),
        axis.transform(FontTransform::Rotate270),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lora-data-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn curves_have_labels_and_survive_nan() {
        let d = dir("curves");
        let path = d.join("sub/loss.svg");
        let series = vec![
            ("train loss".to_string(), vec![(0.0, 2.0), (1.0, f64::NAN), (2.0, 1.0)]),
            ("valid <loss> & co".to_string(), vec![(2.0, 1.5)]),
        ];
        plot_curves(&path, "Loss curve", &series, "step", "cross-entropy").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for needle in ["Loss curve", "step", "cross-entropy", "train loss", "valid &lt;loss&gt; &amp; co"] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        // Empty and single-point inputs still draw.
        plot_curves(&path, "empty", &[], "x", "y").unwrap();
        plot_curves(&path, "one", &[("a".into(), vec![(3.0, 3.0)])], "x", "y").unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn training_two_panels() {
        let d = dir("train");
        let path = d.join("training.svg");
        let loss: Vec<(f64, f64)> = (0..50).map(|s| (s as f64, 1.0 / (1.0 + s as f64))).collect();
        let valid = vec![
            ("accuracy".to_string(), vec![(10.0, 0.6), (20.0, 0.7), (30.0, 0.8)]),
            ("macro_f1".to_string(), vec![(10.0, 0.5), (20.0, 0.65), (30.0, 0.78)]),
        ];
        plot_training(&path, &loss, &valid).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for needle in ["training loss", "validation", "accuracy", "macro_f1", "loss"] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        plot_training(&path, &loss, &[]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(!svg.contains("validation"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn confusion_heatmap() {
        let d = dir("cm");
        let path = d.join("confusion.svg");
        let labels: Vec<String> = ["negative", "positive", "neutral"].iter().map(|s| s.to_string()).collect();
        let cm = vec![vec![50, 3, 2], vec![4, 40, 6], vec![0, 0, 0]];
        plot_confusion(&path, &labels, &cm, "valid confusion").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for needle in ["valid confusion", "negative", "positive", "neutral", "\n50\n", "\n40\n", "91%", "predicted", "true", "rotate"] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        // Darkest cell: the 50 of 55 in row 0.
        let RGBColor(r, g, b) = heat_color(50.0 / 55.0);
        assert!(svg.contains(&format!("#{r:02X}{g:02X}{b:02X}")), "darkest cell colour");
        // Short labels, many classes: no rotation, still valid.
        let labels: Vec<String> = (0..12).map(|i| i.to_string()).collect();
        let cm: Vec<Vec<u64>> = (0..12).map(|i| (0..12).map(|j| (i * j) as u64).collect()).collect();
        plot_confusion(&path, &labels, &cm, "12 classes").unwrap();
        // Long labels are written vertically under the grid.
        let labels: Vec<String> = ["amazon review", "movie snippet", "tweet", "new york times editorial"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let cm = vec![vec![30, 2, 1, 0], vec![3, 25, 0, 2], vec![0, 1, 40, 0], vec![1, 1, 0, 9]];
        plot_confusion(&path, &labels, &cm, "source4 test set").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("new york times editorial") && svg.contains("rotate(270"));
        let e = plot_confusion(&path, &labels, &cm[..3], "bad").unwrap_err().to_string();
        assert!(e.contains("3 rows for 4 labels"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn heat_colors() {
        assert_eq!(heat_color(0.0), RGBColor(247, 251, 255));
        assert_eq!(heat_color(1.0), RGBColor(8, 48, 107));
    }
}
