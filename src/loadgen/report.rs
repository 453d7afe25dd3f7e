//! Load-run statistics and the final report: frames/s, per-frame latency
//! percentiles from an HdrHistogram, errors by kind, verdict counts; printed
//! as a table, JSON or CSV.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::{LoadConfig, Mode, Pacing};
use crate::wire::odin_v1::Verdict;

/// Counts and latencies gathered while the load runs.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latency of measured frames, in microseconds.
    pub latency: Histogram<u64>,
    /// Latency of measured frames answered with a result (no error), in
    /// microseconds: what a client that got its answer waited.
    pub judged_latency: Histogram<u64>,
    /// Engine time of the batch that carried each measured frame, in
    /// microseconds, as the verdicts report it.
    pub compute: Histogram<u64>,
    /// Decode time of each measured frame (waiting for a decoder included),
    /// in microseconds, as the verdicts report it.
    pub decode: Histogram<u64>,
    /// Time each measured frame waited for an engine worker, in
    /// microseconds, as the verdicts report it.
    pub queue: Histogram<u64>,
    /// The server's own time for each measured frame (received to
    /// answered), in microseconds, as the verdicts report it: the rest of
    /// the latency is the network, the client and the answer's way out.
    pub server_total: Histogram<u64>,
    /// Answers of any kind (warm-up included).
    pub answered: u64,
    /// Measured answers (after warm-up).
    pub measured: u64,
    /// Measured verdicts with a result, in-distribution.
    pub in_distribution: u64,
    /// Measured verdicts with a result, out-of-distribution.
    pub out_of_distribution: u64,
    /// Errors (any time) by kind: a verdict's `reason`, or `status:CODE`.
    pub errors: BTreeMap<String, u64>,
    /// Time since start of the first and last measured answers.
    pub window: Option<(Duration, Duration)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: micros(),
            judged_latency: micros(),
            compute: micros(),
            decode: micros(),
            queue: micros(),
            server_total: micros(),
            answered: 0,
            measured: 0,
            in_distribution: 0,
            out_of_distribution: 0,
            errors: BTreeMap::new(),
            window: None,
        }
    }
}

/// A histogram of microseconds: 1 µs to 10 min, 3 significant digits.
fn micros() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

impl Stats {
    /// Records one answer.
    pub fn record(
        &mut self,
        measured: bool,
        latency: Duration,
        at: Duration,
        answer: Result<&Verdict, &tonic::Status>,
    ) {
        self.answered += 1;
        match answer {
            Ok(v) => match &v.error {
                Some(e) => *self.errors.entry(e.reason.clone()).or_default() += 1,
                None if measured => {
                    if v.in_distribution {
                        self.in_distribution += 1;
                    } else {
                        self.out_of_distribution += 1;
                    }
                    let compute = v.timings.map_or(0, |t| t.inference_us);
                    let _ = self.compute.record(compute.clamp(1, 600_000_000));
                    let _ = self
                        .judged_latency
                        .record(latency.as_micros().clamp(1, 600_000_000) as u64);
                    let decode = v.timings.map_or(0, |t| t.decode_us);
                    let _ = self.decode.record(decode.clamp(1, 600_000_000));
                    let queue = v.timings.map_or(0, |t| t.queue_us);
                    let _ = self.queue.record(queue.clamp(1, 600_000_000));
                    let total = v.timings.map_or(0, |t| t.total_us);
                    let _ = self.server_total.record(total.clamp(1, 600_000_000));
                }
                None => {}
            },
            Err(status) => {
                *self
                    .errors
                    .entry(format!("status:{:?}", status.code()))
                    .or_default() += 1
            }
        }
        if measured {
            self.measured += 1;
            let _ = self
                .latency
                .record(latency.as_micros().clamp(1, 600_000_000) as u64);
            self.window = Some(match self.window {
                None => (at, at),
                Some((first, _)) => (first, at),
            });
        }
    }

    /// All errors.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The final report of a load run.
#[derive(Debug, Clone)]
pub struct Report {
    /// What ran, in words.
    pub setup: String,
    /// Frames sent.
    pub sent: u64,
    /// Statistics.
    pub stats: Stats,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Report {
    /// Builds the report of a finished run.
    pub fn new(config: &LoadConfig, stats: Stats, sent: u64, elapsed: Duration) -> Report {
        let mode = match config.mode {
            Mode::Stream => "streams",
            Mode::Unary => "unary workers",
        };
        let pacing = match config.pacing {
            Pacing::Closed { in_flight } => format!("closed loop, {in_flight} in flight each"),
            Pacing::Open { rate } => format!("open loop at {rate} frames/s"),
        };
        Report {
            setup: format!(
                "{} connections x {} {mode}, {pacing}, warm-up {:.1} s",
                config.connections,
                config.streams,
                config.warmup.as_secs_f64()
            ),
            sent,
            stats,
            elapsed,
        }
    }

    /// Measured frames per second (between the first and last measured answers).
    pub fn frames_per_second(&self) -> f64 {
        match self.stats.window {
            Some((first, last)) if last > first => {
                (self.stats.measured - 1) as f64 / (last - first).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Latency at `q` (0..1) in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.stats.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// The `q` quantile of the latency of frames answered with a result, in ms.
    pub fn judged_latency_ms(&self, q: f64) -> f64 {
        self.stats.judged_latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn rows(&self) -> Vec<(&'static str, String)> {
        let s = &self.stats;
        let errors = if s.errors.is_empty() {
            "none".to_string()
        } else {
            s.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        vec![
            ("setup", self.setup.clone()),
            ("frames sent", self.sent.to_string()),
            ("answers", s.answered.to_string()),
            ("measured", s.measured.to_string()),
            ("frames/s", format!("{:.1}", self.frames_per_second())),
            (
                "latency mean ms",
                format!("{:.3}", s.latency.mean() / 1000.0),
            ),
            ("latency p50 ms", format!("{:.3}", self.latency_ms(0.50))),
            ("latency p90 ms", format!("{:.3}", self.latency_ms(0.90))),
            ("latency p95 ms", format!("{:.3}", self.latency_ms(0.95))),
            ("latency p99 ms", format!("{:.3}", self.latency_ms(0.99))),
            ("latency p99.9 ms", format!("{:.3}", self.latency_ms(0.999))),
            (
                "latency max ms",
                format!("{:.3}", s.latency.max() as f64 / 1000.0),
            ),
            ("in-distribution", s.in_distribution.to_string()),
            ("out-of-distribution", s.out_of_distribution.to_string()),
            ("errors", errors),
            ("elapsed s", format!("{:.2}", self.elapsed.as_secs_f64())),
        ]
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (k, v) in self.rows() {
            let _ = writeln!(out, "{k:<20} {v}");
        }
        out
    }

    /// CSV: a header row and one value row.
    pub fn csv(&self) -> String {
        let rows = self.rows();
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let header: Vec<String> = rows.iter().map(|(k, _)| quote(k)).collect();
        let values: Vec<String> = rows.iter().map(|(_, v)| quote(v)).collect();
        format!("{}\n{}\n", header.join(","), values.join(","))
    }

    /// JSON, with numbers as numbers.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "setup": self.setup,
            "sent": self.sent,
            "answered": s.answered,
            "measured": s.measured,
            "frames_per_second": self.frames_per_second(),
            "latency_ms": {
                "mean": s.latency.mean() / 1000.0,
                "p50": self.latency_ms(0.50), "p90": self.latency_ms(0.90), "p95": self.latency_ms(0.95),
                "p99": self.latency_ms(0.99), "p99_9": self.latency_ms(0.999),
                "max": s.latency.max() as f64 / 1000.0,
            },
            "verdicts": {"in_distribution": s.in_distribution, "out_of_distribution": s.out_of_distribution},
            "errors": s.errors,
            "error_count": s.error_count(),
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}
