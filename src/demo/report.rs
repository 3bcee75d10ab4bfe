//! The demo report: one self-contained `index.html` (numbers, inline SVG plots) next to PNG image
//! grids, plus `metrics.json` with every number the page shows.

use std::fmt::Write as _;
use std::path::Path;

use tch::{Kind, Tensor};

/// Writes images [N, C, H, W] (C = 1 or 3, values in [0, 1]) as a PNG grid of `cols` columns,
/// each image scaled up `scale`× (nearest) with a 2 px gap.
pub fn write_grid(path: &Path, images: &Tensor, cols: usize, scale: u32) -> anyhow::Result<()> {
    let size = images.size();
    anyhow::ensure!(size.len() == 4, "grid wants [N, C, H, W], got {size:?}");
    let (n, c, h, w) = (size[0] as usize, size[1], size[2] as u32, size[3] as u32);
    anyhow::ensure!(c == 1 || c == 3, "grid wants 1 or 3 channels, got {c}");
    let img = (images.to_kind(Kind::Float).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .repeat([1, 3 / c, 1, 1]) // (N, 3, H, W)
        .permute([0, 2, 3, 1]) // (N, H, W, 3)
        .contiguous();
    let px = Vec::<u8>::try_from(img.flatten(0, -1))?;
    let cols = cols.max(1).min(n.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2u32;
    let (cw, ch) = (w * scale + gap, h * scale + gap);
    let mut out = image::RgbImage::from_pixel(
        cols as u32 * cw + gap,
        rows as u32 * ch + gap,
        image::Rgb([255, 255, 255]),
    );
    for i in 0..n {
        let (gx, gy) = ((i % cols) as u32 * cw + gap, (i / cols) as u32 * ch + gap);
        for y in 0..h * scale {
            for x in 0..w * scale {
                let o = ((i as u32 * h + y / scale) * w + x / scale) as usize * 3;
                out.put_pixel(gx + x, gy + y, image::Rgb([px[o], px[o + 1], px[o + 2]]));
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    out.save(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// A named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Moving average over `w` points (loss curves are noisy at batch size 64).
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let w = w.max(1);
    let mut out = Vec::with_capacity(points.len());
    let mut acc = 0.0;
    for (i, &(x, y)) in points.iter().enumerate() {
        acc += y;
        if i >= w {
            acc -= points[i - w].1;
        }
        out.push((x, acc / (i + 1).min(w) as f64));
    }
    out
}

/// An SVG line chart (linear axes, legend) of width × height pixels.
pub fn svg_lines(title: &str, xlabel: &str, series: &[Series], width: f64, height: f64) -> String {
    let (ml, mr, mt, mb) = (50.0, 10.0, 24.0, 34.0);
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts.filter(|p| p.1.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 == x0 {
        x1 = x0 + 1.0;
    }
    if y1 == y0 {
        y1 = y0 + 1.0;
    }
    let pw = width - ml - mr;
    let ph = height - mt - mb;
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11"><text x="{}" y="15" text-anchor="middle" font-weight="bold">{}</text><rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
        width / 2.0,
        esc(title)
    );
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text>"##,
            ml - 4.0,
            sy(y) + 4.0,
            fmt_num(y)
        );
        let x = x0 + (x1 - x0) * k as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            sx(x),
            height - mb + 14.0,
            fmt_num(x)
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
        ml + pw / 2.0,
        height - 4.0,
        esc(xlabel)
    );
    for (i, ser) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let path: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><text x="{}" y="{}" fill="{color}">{}</text>"##,
            path.join(" "),
            ml + 6.0,
            mt + 14.0 + 13.0 * i as f64,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Small-multiple histograms: one panel per group (e.g. token counts per class), shared x range.
pub fn svg_histograms(title: &str, groups: &[(String, Vec<i64>)], cols: usize) -> String {
    let lo = groups
        .iter()
        .flat_map(|g| g.1.iter())
        .copied()
        .min()
        .unwrap_or(0);
    let hi = groups
        .iter()
        .flat_map(|g| g.1.iter())
        .copied()
        .max()
        .unwrap_or(1);
    let bins = (hi - lo + 1).max(1) as usize;
    let (pw, ph) = (170.0, 90.0);
    let rows = groups.len().div_ceil(cols.max(1));
    let (w, h) = (
        cols as f64 * (pw + 20.0) + 10.0,
        rows as f64 * (ph + 40.0) + 30.0,
    );
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11"><text x="{}" y="16" text-anchor="middle" font-weight="bold">{}</text>"##,
        w / 2.0,
        esc(title)
    );
    for (gi, (name, vals)) in groups.iter().enumerate() {
        let ox = 10.0 + (gi % cols) as f64 * (pw + 20.0);
        let oy = 30.0 + (gi / cols) as f64 * (ph + 40.0);
        let mut counts = vec![0usize; bins];
        for &v in vals {
            counts[(v - lo) as usize] += 1;
        }
        let cmax = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
        let bw = pw / bins as f64;
        let mean = vals.iter().sum::<i64>() as f64 / vals.len().max(1) as f64;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{} (mean {:.1})</text><line x1="{ox}" y1="{}" x2="{}" y2="{}" stroke="#999"/>"##,
            ox + pw / 2.0,
            oy + 10.0,
            esc(name),
            mean,
            oy + 14.0 + ph,
            ox + pw,
            oy + 14.0 + ph
        );
        for (b, &c) in counts.iter().enumerate() {
            let bh = c as f64 / cmax * ph;
            let _ = write!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"/>"##,
                ox + b as f64 * bw,
                oy + 14.0 + ph - bh,
                (bw - 0.5).max(0.5),
                bh,
                PALETTE[gi % PALETTE.len()]
            );
        }
        let _ = write!(
            s,
            r##"<text x="{ox}" y="{}">{lo}</text><text x="{}" y="{}" text-anchor="end">{hi}</text>"##,
            oy + ph + 26.0,
            ox + pw,
            oy + ph + 26.0
        );
    }
    s.push_str("</svg>");
    s
}

/// The HTML page, built section by section.
#[derive(Default)]
pub struct Html {
    body: String,
}

impl Html {
    pub fn h2(&mut self, t: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", esc(t));
    }

    pub fn p(&mut self, t: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", esc(t));
    }

    /// Raw HTML/SVG the demo built itself.
    pub fn raw(&mut self, html: &str) {
        self.body.push_str(html);
        self.body.push('\n');
    }

    pub fn img(&mut self, src: &str, alt: &str) {
        let _ = writeln!(
            self.body,
            "<img src=\"{}\" alt=\"{}\" style=\"image-rendering:pixelated\">",
            esc(src),
            esc(alt)
        );
    }

    /// A table; the first row is the header.
    pub fn table(&mut self, rows: &[Vec<String>]) {
        self.body.push_str("<table>\n");
        for (i, r) in rows.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            self.body.push_str("<tr>");
            for c in r {
                let _ = write!(self.body, "<{tag}>{}</{tag}>", esc(c));
            }
            self.body.push_str("</tr>\n");
        }
        self.body.push_str("</table>\n");
    }

    pub fn write(&self, path: &Path, title: &str) -> anyhow::Result<()> {
        let page = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}.ok{{color:#080}}.bad{{color:#b00}}</style></head><body><h1>{t}</h1>\n{}</body></html>\n",
            self.body,
            t = esc(title)
        );
        lavit_runtime::checkpoint::atomic_write(path, page.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_is_well_formed_enough() {
        let s = svg_lines(
            "loss",
            "step",
            &[Series {
                name: "a<b".into(),
                points: vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)],
            }],
            400.0,
            200.0,
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("a&lt;b"));
        let h = svg_histograms("t", &[("x".into(), vec![3, 4, 4]), ("y".into(), vec![])], 2);
        assert_eq!(h.matches("<rect").count(), 4);
    }

    #[test]
    fn smoothing_averages() {
        let s = smooth(&[(0.0, 2.0), (1.0, 4.0), (2.0, 6.0)], 2);
        assert_eq!(s[0].1, 2.0);
        assert_eq!(s[1].1, 3.0);
        assert_eq!(s[2].1, 5.0);
    }
}
