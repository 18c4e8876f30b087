//! `--plot DIR`: one SVG per scenario that recorded its source queries over
//! time, with a line per strategy of the queries sent in each 100 ms.
//!
//! The SVG is plain text written here: axes, a step line per row, a legend.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use super::report::Row;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 52.0;
/// One color per strategy, in row order (repeating past the last).
const COLORS: [&str; 6] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
/// Milliseconds per point of a series.
const BUCKET_MS: f64 = 100.0;

/// Writes `DIR/<scenario>.svg` for every scenario whose rows carry queries per
/// 100 ms; returns the files written.
pub(super) fn write(dir: &Path, rows: &[Row]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plot directory {}", dir.display()))?;
    let mut scenarios: Vec<&str> = Vec::new();
    for row in rows.iter().filter(|r| r.db_queries_per_100ms.is_some()) {
        if !scenarios.contains(&row.scenario) {
            scenarios.push(row.scenario);
        }
    }
    let mut written = Vec::new();
    for scenario in scenarios {
        let series: Vec<(&str, &[u64])> = rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| Some((r.strategy, r.db_queries_per_100ms.as_deref()?)))
            .collect();
        let path = dir.join(format!("{scenario}.svg"));
        std::fs::write(&path, svg(scenario, &series))
            .with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The chart of `series` (strategy, queries per 100 ms).
fn svg(scenario: &str, series: &[(&str, &[u64])]) -> String {
    let buckets = series
        .iter()
        .map(|(_, s)| s.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let peak = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .max()
        .unwrap_or(0);
    let y_max = nice_ceiling(peak.max(1));
    // Counts and bucket numbers are far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let (x_span, y_span) = (buckets as f64 * BUCKET_MS, y_max as f64);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |ms: f64| LEFT + ms / x_span * plot_w;
    let y = |v: f64| TOP + plot_h - v / y_span * plot_h;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{}: database queries per 100 ms</text>"#,
        escape(scenario)
    );
    // Horizontal grid and y labels.
    for i in 0..=4 {
        let v = y_max * i / 4;
        #[allow(clippy::cast_precision_loss)]
        let yy = y(v as f64);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
    }
    // X ticks every second (or every 100 ms for short runs).
    let step_ms = if x_span > 2_000.0 { 1_000.0 } else { 100.0 };
    let mut t = 0.0;
    while t <= x_span + 0.5 {
        let xx = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 4.0,
            TOP + plot_h + 18.0,
            format_ms(t)
        );
        t += step_ms;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the load started</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#333"/>"##
    );
    // One step line per strategy, and its legend entry.
    for (i, (strategy, counts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut points = String::new();
        for (b, &count) in counts.iter().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let (from, v) = (b as f64 * BUCKET_MS, count as f64);
            let _ = write!(
                points,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(from),
                y(v),
                x(from + BUCKET_MS),
                y(v)
            );
        }
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            points.trim_end()
        );
        #[allow(clippy::cast_precision_loss)]
        let ly = TOP + 14.0 + 16.0 * i as f64;
        let lx = WIDTH - RIGHT - 250.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            lx + 24.0,
            escape(strategy)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `v`.
fn nice_ceiling(v: u64) -> u64 {
    let mut p = 1_u64;
    // Bounded: a u64 has at most 20 decimal digits.
    for _ in 0..20 {
        for m in [1, 2, 5] {
            if let Some(c) = p.checked_mul(m)
                && c >= v
            {
                return c;
            }
        }
        match p.checked_mul(10) {
            Some(next) => p = next,
            None => break,
        }
    }
    v
}

fn format_ms(ms: f64) -> String {
    if ms >= 1_000.0 {
        format!("{:.1}s", ms / 1_000.0)
    } else {
        format!("{ms:.0}ms")
    }
}

/// Text safe inside SVG elements.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(1), 1);
        assert_eq!(nice_ceiling(3), 5);
        assert_eq!(nice_ceiling(1261), 2000);
        assert_eq!(nice_ceiling(200), 200);
        assert_eq!(nice_ceiling(u64::MAX), u64::MAX);
    }

    #[test]
    fn one_line_per_strategy() {
        let svg = svg(
            "avalanche",
            &[("fixed TTL", &[0, 5, 1]), ("a <b> & c", &[1, 1])],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
    }
}
