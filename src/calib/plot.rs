//! ROC curves as a small, dependency-free SVG: one plot per OOD set, one
//! curve per method, so a user can look rather than read.

use std::fmt::Write;

/// One curve: a legend label and its (FPR, TPR) points.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Legend text.
    pub label: String,
    /// (FPR, TPR) points from (0, 0) to (1, 1).
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 12] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#000000", "#aec7e8",
];

/// Renders the ROC curves of one OOD set as an SVG document.
pub fn roc_svg(title: &str, curves: &[Curve]) -> String {
    let (size, margin) = (420.0, 50.0);
    let x = |fpr: f64| margin + fpr * size;
    let y = |tpr: f64| margin + (1.0 - tpr) * size;
    let mut svg = String::new();
    let longest = curves
        .iter()
        .map(|c| c.label.chars().count())
        .max()
        .unwrap_or(0);
    let legend = (longest as f64 * 6.5 + 40.0).max(270.0);
    let rows = margin + 20.0 * curves.len() as f64 + 20.0;
    let (w, h) = (
        size + 2.0 * margin + legend,
        (size + 2.0 * margin).max(rows),
    );
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="25" font-size="15">{}</text>"#,
        margin,
        escape(title)
    );
    // Axes, grid and the chance diagonal.
    for i in 0..=4 {
        let v = i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            x(v),
            y(0.0),
            x(v),
            y(1.0),
            x(0.0),
            y(v),
            x(1.0),
            y(v)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            y(0.0) + 16.0
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.2}</text>"#,
            x(0.0) - 6.0,
            y(v) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{}" y="{}" width="{size}" height="{size}" fill="none" stroke="#333"/><line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#999" stroke-dasharray="4 4"/>"##,
        x(0.0),
        y(1.0),
        x(0.0),
        y(0.0),
        x(1.0),
        y(1.0)
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">false-positive rate (OOD kept)</text>"#,
        x(0.5),
        h - 10.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">true-positive rate (ID kept)</text>"#,
        y(0.5),
        y(0.5)
    );
    for (i, curve) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // Past the palette, dashed lines tell the curves apart.
        let dash = if i >= COLORS.len() {
            r#" stroke-dasharray="6,3""#
        } else {
            ""
        };
        let points: String = curve
            .points
            .iter()
            .map(|(f, t)| format!("{:.1},{:.1} ", x(*f), y(*t)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{points}"/>"#
        );
        let ly = margin + 20.0 * i as f64 + 10.0;
        let lx = margin + size + 15.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 20.0,
            lx + 26.0,
            ly + 4.0,
            escape(&curve.label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_polyline_per_curve_and_escapes_labels() {
        let curve = |label: &str| Curve {
            label: label.into(),
            points: vec![(0.0, 0.0), (0.2, 0.9), (1.0, 1.0)],
        };
        let svg = roc_svg("ID vs <OOD>", &[curve("msp"), curve("odin T=1000")]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("&lt;OOD&gt;") && svg.contains("odin T=1000"));
    }
}
