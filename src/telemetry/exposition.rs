//! The Prometheus text exposition format (0.0.4) of the metrics registry,
//! as `/metrics` serves it.

use std::fmt::Write as _;

use super::metrics::{Gauges, HistogramSnapshot, Kind, Metrics, Value};

/// Prometheus text exposition format 0.0.4 of every metric.
pub fn render(metrics: &Metrics, gauges: Gauges) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for family in metrics.families(gauges) {
        let name = family.prometheus_name();
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", family.help);
        for point in &family.points {
            let labels: Vec<String> = point
                .labels
                .iter()
                .map(|(k, v)| format!("{}=\"{v}\"", k.replace('.', "_")))
                .collect();
            let labels = labels.join(",");
            match &point.value {
                Value::Int(v) => {
                    let _ = writeln!(out, "{name}{} {v}", braces(&labels));
                }
                Value::Histogram(h) => histogram(&mut out, &name, &labels, h),
            }
        }
    }
    out
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, count) in h.bounds.iter().zip(&h.buckets) {
        cumulative += count;
        let _ = writeln!(
            out,
            r#"{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}"#
        );
    }
    let _ = writeln!(
        out,
        r#"{name}_bucket{{{labels}{sep}le="+Inf"}} {}"#,
        h.count
    );
    let _ = writeln!(out, "{name}_sum{} {}", braces(labels), h.sum);
    let _ = writeln!(out, "{name}_count{} {}", braces(labels), h.count);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::Reason;
    use crate::telemetry::metrics::{Outcome, Rpc};

    #[test]
    fn renders_counts_by_verdict_and_cumulative_buckets() {
        let m = Metrics::default();
        m.frame(Rpc::Detect, Duration::from_millis(2), Outcome::In, None);
        m.frame(
            Rpc::Detect,
            Duration::from_millis(20),
            Outcome::Error,
            Some(Reason::DecodeFailed),
        );
        m.batch_size.record(3.0);
        let text = render(
            &m,
            Gauges {
                queue_depth: 4,
                in_flight: 5,
                held_bytes: 6,
                budget_bytes: 7,
            },
        );
        assert!(
            text.contains(r#"odin_frames_total{verdict="in"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"odin_frames_total{verdict="error"} 1"#));
        assert!(text.contains(r#"odin_frame_errors_total{reason="DECODE_FAILED"} 1"#));
        assert!(text.contains(r#"rpc_method="Detect",le="0.0025"} 1"#));
        assert!(text.contains(r#"rpc_method="Detect",le="+Inf"} 2"#));
        assert!(text.contains(r#"odin_batch_size_bucket{le="4"} 1"#));
        assert!(text.contains("odin_queue_depth 4\n"));
        assert!(text.contains("odin_frames_in_flight 5\n"));
        assert!(text.contains("odin_frames_held_bytes 6\n"));
    }
}
