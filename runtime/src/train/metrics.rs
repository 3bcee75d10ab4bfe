//! The metrics log of a training run: one JSON line per step in `metrics.jsonl`, and a
//! report drawn from it: `metrics.html` (one inline-SVG chart per metric, no scripts) and
//! `loss.png` (every `*loss*` series on one plot, drawn with `plotters`: titled, labelled axes,
//! a legend; text in DejaVu Sans embedded in the binary, so no system font is needed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::checkpoint::atomic_write;
use crate::error::{Error, Result};

/// One step's values.
pub type Record = (i64, BTreeMap<String, f64>);

pub struct MetricsLog {
    dir: PathBuf,
    file: std::fs::File,
    records: Vec<Record>,
}

const JSONL: &str = "metrics.jsonl";

impl MetricsLog {
    /// Open `dir/metrics.jsonl`, keeping the records of steps before `resume_step` (pass 0
    /// for a fresh run): after a resume the log continues exactly where the checkpoint was.
    pub fn open(dir: &Path, resume_step: i64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(JSONL);
        let mut records = Vec::new();
        if resume_step > 0 && path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            for line in text.lines() {
                // A torn last line (killed mid-write) is dropped.
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if let Some(r) = parse_record(&v) {
                    if r.0 < resume_step {
                        records.push(r);
                    }
                }
            }
        }
        let mut text = String::new();
        for r in &records {
            text.push_str(&record_line(r));
            text.push('\n');
        }
        atomic_write(&path, text.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            records,
        })
    }

    /// Append one step (non-finite values are written as `null` and not plotted).
    pub fn log(&mut self, step: i64, values: &[(&str, f64)]) -> Result<()> {
        let r: Record = (
            step,
            values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        );
        let line = record_line(&r);
        let path = self.dir.join(JSONL);
        writeln!(self.file, "{line}").map_err(|e| Error::io(&path, e))?;
        self.file.flush().map_err(|e| Error::io(&path, e))?;
        self.records.push(r);
        Ok(())
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The series of one metric as (step, value), finite values only.
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        series(&self.records, key)
    }

    /// Write `metrics.html` and `loss.png` into the run folder; returns their paths.
    pub fn write_report(&self, title: &str) -> Result<(PathBuf, PathBuf)> {
        let html = self.dir.join("metrics.html");
        atomic_write(&html, render_html(title, &self.records).as_bytes())?;
        let png = self.dir.join("loss.png");
        let keys: Vec<String> = metric_keys(&self.records)
            .into_iter()
            .filter(|k| k.contains("loss"))
            .collect();
        let series: Vec<(String, Vec<(f64, f64)>)> =
            keys.iter().map(|k| (k.clone(), self.series(k))).collect();
        let plot = LinePlot {
            title,
            x_label: "step",
            y_label: "loss",
            series: &series,
        };
        write_plot_png(&png, &plot, 800, 400)?;
        Ok((html, png))
    }
}

fn record_line(r: &Record) -> String {
    let mut m = serde_json::Map::new();
    m.insert("step".into(), r.0.into());
    for (k, v) in &r.1 {
        let j = serde_json::Number::from_f64(*v)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null);
        m.insert(k.clone(), j);
    }
    serde_json::Value::Object(m).to_string()
}

fn parse_record(v: &serde_json::Value) -> Option<Record> {
    let o = v.as_object()?;
    let step = o.get("step")?.as_i64()?;
    let vals = o
        .iter()
        .filter(|(k, _)| k.as_str() != "step")
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(f64::NAN)))
        .collect();
    Some((step, vals))
}

fn metric_keys(records: &[Record]) -> Vec<String> {
    let mut keys = std::collections::BTreeSet::new();
    for (_, m) in records {
        keys.extend(m.keys().cloned());
    }
    keys.into_iter().collect()
}

fn series(records: &[Record], key: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|(s, m)| {
            m.get(key)
                .filter(|v| v.is_finite())
                .map(|v| (*s as f64, *v))
        })
        .collect()
}

/// Data bounds of several series, widened when flat.
fn bounds(lines: &[Vec<(f64, f64)>]) -> Option<(f64, f64, f64, f64)> {
    let pts = lines.iter().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    let mut any = false;
    for &(x, y) in pts {
        any = true;
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !any {
        return None;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        let pad = y0.abs().max(1.0) * 0.05;
        y0 -= pad;
        y1 += pad;
    }
    Some((x0, x1, y0, y1))
}

const COLORS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [255, 127, 14],
    [148, 103, 189],
    [23, 190, 207],
];

fn render_html(title: &str, records: &[Record]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut h = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:1em}}</style>\
         </head><body>\n<h1>{t}</h1>\n<p>{n} steps logged.</p>\n",
        t = esc(title),
        n = records.len()
    );
    let (w, hgt, pad) = (560.0, 220.0, 44.0);
    for (i, key) in metric_keys(records).iter().enumerate() {
        let s = series(records, key);
        let Some((x0, x1, y0, y1)) = bounds(std::slice::from_ref(&s)) else {
            continue;
        };
        // At most ~2000 points per polyline.
        let stride = s.len().div_ceil(2000).max(1);
        let pts: Vec<String> = s
            .iter()
            .step_by(stride)
            .map(|&(x, y)| {
                let px = pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
                let py = hgt - pad - (y - y0) / (y1 - y0) * (hgt - 2.0 * pad);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let [r, g, b] = COLORS[i % COLORS.len()];
        let last = s.last().map(|p| p.1).unwrap_or(f64::NAN);
        h.push_str(&format!(
            "<figure><figcaption><b>{k}</b> (last {last:.5})</figcaption>\
             <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" viewBox=\"0 0 {w} {hgt}\">\
             <rect width=\"100%\" height=\"100%\" fill=\"white\" stroke=\"#ccc\"/>\
             <line x1=\"{pad}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"black\"/>\
             <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{yb}\" stroke=\"black\"/>\
             <text x=\"2\" y=\"{pad}\" font-size=\"10\">{y1:.4}</text>\
             <text x=\"2\" y=\"{yb}\" font-size=\"10\">{y0:.4}</text>\
             <text x=\"{pad}\" y=\"{xt}\" font-size=\"10\">{x0}</text>\
             <text x=\"{xr}\" y=\"{xt}\" font-size=\"10\" text-anchor=\"end\">{x1}</text>\
             <polyline fill=\"none\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"1.5\" points=\"{p}\"/>\
             </svg></figure>\n",
            k = esc(key),
            yb = hgt - pad,
            xr = w - pad,
            xt = hgt - pad + 14.0,
            p = pts.join(" "),
        ));
    }
    h.push_str("</body></html>\n");
    h
}

/// A line chart: a title, axis labels and named series of (x, y) points.
pub struct LinePlot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a [(String, Vec<(f64, f64)>)],
}

/// The font family name the plots use (DejaVu Sans, registered once from the embedded bytes).
const FONT: &str = "lavit-sans";

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the embedded plot font does not parse"))
    }
}

/// Draw `plot` with plotters (white background, light grid, one coloured line per series and
/// a legend) and write it as PNG. Series without points are left out; no points at all give
/// an empty titled frame.
pub fn write_plot_png(path: &Path, plot: &LinePlot, width: u32, height: u32) -> Result<()> {
    let bytes = render_plot_png(plot, width, height)
        .map_err(|e| Error::invalid(format!("{}: drawing the plot: {e}", path.display())))?;
    atomic_write(path, &bytes)
}

fn render_plot_png(
    plot: &LinePlot,
    width: u32,
    height: u32,
) -> std::result::Result<Vec<u8>, Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    register_font()?;
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let lines: Vec<Vec<(f64, f64)>> = plot.series.iter().map(|(_, p)| p.clone()).collect();
        let (x0, x1, y0, y1) = bounds(&lines).unwrap_or((0.0, 1.0, 0.0, 1.0));
        let mut builder = ChartBuilder::on(&root);
        if !plot.title.is_empty() {
            builder.caption(plot.title, (FONT, 18).into_font());
        }
        let mut chart = builder
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_desc(plot.x_label)
            .y_desc(plot.y_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()?;
        let mut labelled = false;
        for (i, (name, pts)) in plot.series.iter().enumerate() {
            if pts.is_empty() {
                continue;
            }
            let [r, g, b] = COLORS[i % COLORS.len()];
            let color = RGBColor(r, g, b);
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            labelled = true;
        }
        if labelled {
            chart
                .configure_series_labels()
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        root.present()?;
    }
    let img = image::RgbImage::from_raw(width, height, buf).ok_or("pixel buffer size")?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    Ok(bytes)
}

/// `lines` as a plot without names or labels ([`write_plot_png`] with `series 1`, `series 2`,
/// …, axes labelled `step` and `value`).
pub fn write_line_plot_png(
    path: &Path,
    lines: &[Vec<(f64, f64)>],
    width: u32,
    height: u32,
) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("series {}", i + 1), l.clone()))
        .collect();
    let plot = LinePlot {
        title: "",
        x_label: "step",
        y_label: "value",
        series: &series,
    };
    write_plot_png(path, &plot, width, height)
}
