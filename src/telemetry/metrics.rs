//! The sidecar's metrics: a fixed registry of atomics, read as `Family`s
//! that both exports share (Prometheus text in `exposition`, the OTLP push
//! in `push`), so they always agree.
//!
//! Why not the OpenTelemetry metrics SDK or the `prometheus` crate: every
//! series here is known at compile time (stages, verdicts, error reasons are
//! closed sets), so a struct of atomics records a frame with a handful of
//! relaxed adds and no attribute hashing, locking or allocation on the
//! request path, and the text exposition format is forty lines to write.
//! Both crates would add a dependency tree and a per-record lookup to buy
//! flexibility this registry does not need.
//!
//! Names follow the OpenTelemetry semantic conventions where one exists
//! (`rpc.server.duration`, in seconds like the stable HTTP conventions) and
//! map to Prometheus the way the OpenTelemetry Prometheus exporter does:
//! dots become underscores, the unit is suffixed, counters end in `_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::Reason;

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 10 s,
/// roughly ×2.5 apart, so a CPU frame (~ms) and a stalled queue both resolve.
const LATENCY_BOUNDS: [f64; 16] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Upper bounds of the batch-size histogram's buckets (powers of two).
const BATCH_BOUNDS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The stages of a frame, as they appear in the `stage` label and as span
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading the frame's scoring and trace context.
    Receive,
    /// Decoding and preprocessing the image (waiting for a decoder included).
    Decode,
    /// Waiting in the engine queue until its batch started.
    Queue,
    /// The engine run of the frame's batch.
    Batch,
    /// Scoring the logits into a verdict.
    Score,
    /// Waiting for earlier frames of the stream and sending the verdict.
    Respond,
}

impl Stage {
    /// Every stage, in data-path order.
    pub const ALL: [Stage; 6] = [
        Stage::Receive,
        Stage::Decode,
        Stage::Queue,
        Stage::Batch,
        Stage::Score,
        Stage::Respond,
    ];

    /// The stage's name (label value and span name).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Receive => "receive",
            Stage::Decode => "decode",
            Stage::Queue => "queue",
            Stage::Batch => "batch",
            Stage::Score => "score",
            Stage::Respond => "respond",
        }
    }
}

/// How a frame ended, for `odin.frames{verdict}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Judged in-distribution.
    In,
    /// Judged out-of-distribution.
    Out,
    /// Not judged: the verdict carries an error.
    Error,
}

impl Outcome {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::In => "in",
            Outcome::Out => "out",
            Outcome::Error => "error",
        }
    }
}

/// A histogram with fixed buckets, recorded lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    // One count per bound plus the +Inf bucket; not cumulative (rendering
    // accumulates), so a record touches one bucket.
    buckets: Vec<AtomicU64>,
    // Sum in nanounits (ns for durations), so it stays an integer add.
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn record(&self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((value * 1e9).max(0.0) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn record_duration(&self, d: Duration) {
        self.record(d.as_secs_f64());
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Instantaneous values read at scrape time from the pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Frames waiting in the engine queue.
    pub queue_depth: u64,
    /// Frames received and not yet answered.
    pub in_flight: u64,
    /// Bytes of frames held, out of the memory budget.
    pub held_bytes: u64,
    /// The memory budget, in bytes.
    pub budget_bytes: u64,
}

/// Every metric of one sidecar. Shared by the pipeline, the batcher, the
/// service and the exporter; one per `App`, so tests running several
/// sidecars in one process count separately.
#[derive(Debug)]
pub struct Metrics {
    /// End-to-end latency per frame (`rpc.server.duration`), per RPC method.
    duration_detect: Histogram,
    duration_detect_one: Histogram,
    duration_model_infer: Histogram,
    duration_model_stream_infer: Histogram,
    stages: [Histogram; 6],
    /// Frames per engine run.
    pub batch_size: Histogram,
    frames: [AtomicU64; 3],
    errors: [AtomicU64; Reason::ALL.len()],
    /// Spans dropped because the export queue was full or an export failed.
    pub spans_dropped: AtomicU64,
    /// Spans handed to the exporter successfully.
    pub spans_exported: AtomicU64,
    /// `Detect` streams open now.
    pub streams_open: AtomicU64,
    /// Client connections open now.
    pub connections_open: AtomicU64,
    /// Connections closed at once at the connection limit.
    pub connections_refused: AtomicU64,
    /// Calls refused whole (see `CallError`).
    pub calls_refused: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            duration_detect: Histogram::new(&LATENCY_BOUNDS),
            duration_detect_one: Histogram::new(&LATENCY_BOUNDS),
            duration_model_infer: Histogram::new(&LATENCY_BOUNDS),
            duration_model_stream_infer: Histogram::new(&LATENCY_BOUNDS),
            stages: std::array::from_fn(|_| Histogram::new(&LATENCY_BOUNDS)),
            batch_size: Histogram::new(&BATCH_BOUNDS),
            frames: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            spans_dropped: AtomicU64::new(0),
            spans_exported: AtomicU64::new(0),
            streams_open: AtomicU64::new(0),
            connections_open: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            calls_refused: AtomicU64::new(0),
        }
    }
}

/// The RPC a frame came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// A frame of a `Detect` stream.
    Detect,
    /// A `DetectOne` call.
    DetectOne,
    /// An element of a KServe v2 `ModelInfer` call.
    ModelInfer,
    /// An element of a request on a KServe v2 `ModelStreamInfer` stream.
    ModelStreamInfer,
    /// In-process, without gRPC (`detect`, benchmarks).
    InProcess,
}

impl Rpc {
    /// The `rpc.service` value.
    pub fn service(self) -> &'static str {
        match self {
            Rpc::Detect | Rpc::DetectOne | Rpc::InProcess => "odin.v1.Detector",
            Rpc::ModelInfer | Rpc::ModelStreamInfer => "inference.GRPCInferenceService",
        }
    }

    /// The `rpc.method` value.
    pub fn name(self) -> &'static str {
        match self {
            Rpc::Detect => "Detect",
            Rpc::DetectOne => "DetectOne",
            Rpc::ModelInfer => "ModelInfer",
            Rpc::ModelStreamInfer => "ModelStreamInfer",
            Rpc::InProcess => "in-process",
        }
    }
}

impl Metrics {
    /// Records one stage of one frame.
    pub fn stage(&self, stage: Stage, d: Duration) {
        self.stages[stage as usize].record_duration(d);
    }

    /// The histogram of one stage.
    pub fn stage_histogram(&self, stage: Stage) -> &Histogram {
        &self.stages[stage as usize]
    }

    /// Records a finished frame: its end-to-end latency, outcome and, for
    /// an error, its reason.
    pub fn frame(&self, rpc: Rpc, total: Duration, outcome: Outcome, reason: Option<Reason>) {
        match rpc {
            Rpc::Detect => self.duration_detect.record_duration(total),
            Rpc::DetectOne => self.duration_detect_one.record_duration(total),
            Rpc::ModelInfer => self.duration_model_infer.record_duration(total),
            Rpc::ModelStreamInfer => self.duration_model_stream_infer.record_duration(total),
            // In-process frames are no RPC; their stages still count.
            Rpc::InProcess => {}
        }
        self.frames[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(reason) = reason {
            self.errors[reason.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frames answered with `outcome` so far.
    pub fn frames(&self, outcome: Outcome) -> u64 {
        self.frames[outcome as usize].load(Ordering::Relaxed)
    }

    /// Every metric, read now: what both exports (Prometheus text and OTLP)
    /// are made from, so they always agree.
    pub fn families(&self, gauges: Gauges) -> Vec<Family> {
        let rpc = |rpc: Rpc| {
            vec![
                ("rpc.system", "grpc".to_string()),
                ("rpc.service", rpc.service().to_string()),
                ("rpc.method", rpc.name().to_string()),
            ]
        };
        let int = |labels, v: &AtomicU64| Point {
            labels,
            value: Value::Int(v.load(Ordering::Relaxed)),
        };
        let gauge = |v: u64| Point {
            labels: Vec::new(),
            value: Value::Int(v),
        };
        vec![
            Family {
                name: "rpc.server.duration",
                unit: "s",
                kind: Kind::Histogram,
                help: "End-to-end latency of each frame, from arrival to verdict sent.",
                points: vec![
                    self.duration_detect.point(rpc(Rpc::Detect)),
                    self.duration_detect_one.point(rpc(Rpc::DetectOne)),
                    self.duration_model_infer.point(rpc(Rpc::ModelInfer)),
                    self.duration_model_stream_infer
                        .point(rpc(Rpc::ModelStreamInfer)),
                ],
            },
            Family {
                name: "odin.frame.stage.duration",
                unit: "s",
                kind: Kind::Histogram,
                help:
                    "Time each frame spent in each stage (queue = waiting for its batch to start).",
                points: Stage::ALL
                    .iter()
                    .map(|s| {
                        self.stage_histogram(*s)
                            .point(vec![("stage", s.name().to_string())])
                    })
                    .collect(),
            },
            Family {
                name: "odin.batch.size",
                unit: "{frame}",
                kind: Kind::Histogram,
                help: "Frames per engine run.",
                points: vec![self.batch_size.point(Vec::new())],
            },
            Family {
                name: "odin.frames",
                unit: "{frame}",
                kind: Kind::Counter,
                help: "Frames answered, by verdict (in, out or error).",
                points: [Outcome::In, Outcome::Out, Outcome::Error]
                    .iter()
                    .map(|o| {
                        int(
                            vec![("verdict", o.name().to_string())],
                            &self.frames[*o as usize],
                        )
                    })
                    .collect(),
            },
            Family {
                name: "odin.frame.errors",
                unit: "{frame}",
                kind: Kind::Counter,
                help: "Frames answered with an error, by reason.",
                points: Reason::ALL
                    .iter()
                    .zip(&self.errors)
                    .map(|(r, c)| int(vec![("reason", r.as_str().to_string())], c))
                    .collect(),
            },
            Family {
                name: "odin.spans.dropped",
                unit: "{span}",
                kind: Kind::Counter,
                help: "Spans dropped because the export queue was full or an export failed.",
                points: vec![int(Vec::new(), &self.spans_dropped)],
            },
            Family {
                name: "odin.spans.exported",
                unit: "{span}",
                kind: Kind::Counter,
                help: "Spans the OTLP exporter delivered.",
                points: vec![int(Vec::new(), &self.spans_exported)],
            },
            Family {
                name: "odin.queue.depth",
                unit: "{frame}",
                kind: Kind::Gauge,
                help: "Frames waiting in the engine queue.",
                points: vec![gauge(gauges.queue_depth)],
            },
            Family {
                name: "odin.streams.open",
                unit: "{stream}",
                kind: Kind::Gauge,
                help: "Detect and ModelStreamInfer streams open.",
                points: vec![gauge(self.streams_open.load(Ordering::Relaxed))],
            },
            Family {
                name: "odin.frames.in_flight",
                unit: "{frame}",
                kind: Kind::Gauge,
                help: "Frames received and not yet answered.",
                points: vec![gauge(gauges.in_flight)],
            },
            Family {
                name: "odin.frames.held_bytes",
                unit: "By",
                kind: Kind::Gauge,
                help: "Bytes of frames the server holds now, out of its memory budget.",
                points: vec![gauge(gauges.held_bytes)],
            },
            Family {
                name: "odin.frames.budget_bytes",
                unit: "By",
                kind: Kind::Gauge,
                help: "The memory budget for frames held (--memory-budget-mib).",
                points: vec![gauge(gauges.budget_bytes)],
            },
            Family {
                name: "odin.connections.open",
                unit: "{connection}",
                kind: Kind::Gauge,
                help: "Client connections open now.",
                points: vec![gauge(self.connections_open.load(Ordering::Relaxed))],
            },
            Family {
                name: "odin.connections.refused",
                unit: "{connection}",
                kind: Kind::Counter,
                help: "Connections closed at once because the connection limit was reached.",
                points: vec![int(Vec::new(), &self.connections_refused)],
            },
            Family {
                name: "odin.calls.refused",
                unit: "{call}",
                kind: Kind::Counter,
                help: "Calls refused whole: over a limit, the memory budget, unauthenticated, or shutting down.",
                points: vec![int(Vec::new(), &self.calls_refused)],
            },
        ]
    }
}

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic, cumulative since start.
    Counter,
    /// A value read now.
    Gauge,
    /// A distribution, cumulative since start.
    Histogram,
}

/// One metric with all its series.
#[derive(Debug, Clone)]
pub struct Family {
    /// OpenTelemetry name (dotted).
    pub name: &'static str,
    /// UCUM unit (`s`, `{frame}`).
    pub unit: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// One line of description.
    pub help: &'static str,
    /// One point per label set.
    pub points: Vec<Point>,
}

impl Family {
    /// The Prometheus name, as the OpenTelemetry Prometheus exporter spells
    /// it: dots to underscores, `_seconds` for `s`, `_total` for counters.
    pub fn prometheus_name(&self) -> String {
        let mut name = self.name.replace('.', "_");
        if self.unit == "s" {
            name.push_str("_seconds");
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

/// One series of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Attribute names (OpenTelemetry spelling) and values.
    pub labels: Vec<(&'static str, String)>,
    /// Its value.
    pub value: Value,
}

/// A series' value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter or gauge.
    Int(u64),
    /// A histogram.
    Histogram(HistogramSnapshot),
}

/// A histogram read at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the finite buckets.
    pub bounds: &'static [f64],
    /// Count per bucket (not cumulative), the last one for +Inf.
    pub buckets: Vec<u64>,
    /// Sum of recorded values.
    pub sum: f64,
    /// Values recorded (the sum of `buckets`).
    pub count: u64,
}

impl Histogram {
    fn point(&self, labels: Vec<(&'static str, String)>) -> Point {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        Point {
            labels,
            value: Value::Histogram(HistogramSnapshot {
                bounds: self.bounds,
                // The count is the buckets' sum, so the two agree in one read.
                count: buckets.iter().sum(),
                buckets,
                sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter() {
        let m = Metrics::default();
        for reason in Reason::ALL {
            m.frame(Rpc::Detect, Duration::ZERO, Outcome::Error, Some(reason));
        }
        let families = m.families(Gauges::default());
        let errors = families
            .iter()
            .find(|f| f.name == "odin.frame.errors")
            .expect("errors family");
        assert_eq!(errors.points.len(), Reason::ALL.len());
        for point in &errors.points {
            assert_eq!(point.value, Value::Int(1), "{:?}", point.labels);
        }
        assert_eq!(m.frames(Outcome::Error), Reason::ALL.len() as u64);
    }

    #[test]
    fn each_rpc_has_its_own_duration_series_under_its_service() {
        let m = Metrics::default();
        m.frame(Rpc::ModelInfer, Duration::ZERO, Outcome::In, None);
        m.frame(Rpc::ModelInfer, Duration::ZERO, Outcome::Out, None);
        m.frame(Rpc::ModelStreamInfer, Duration::ZERO, Outcome::In, None);
        m.frame(Rpc::InProcess, Duration::ZERO, Outcome::In, None);
        let families = m.families(Gauges::default());
        let durations = families
            .iter()
            .find(|f| f.name == "rpc.server.duration")
            .expect("duration family");
        let counts: Vec<(String, String, u64)> = durations
            .points
            .iter()
            .map(|p| {
                let Value::Histogram(h) = &p.value else {
                    panic!("a histogram")
                };
                (p.labels[1].1.clone(), p.labels[2].1.clone(), h.count)
            })
            .collect();
        let kserve = "inference.GRPCInferenceService".to_string();
        let odin = "odin.v1.Detector".to_string();
        assert_eq!(
            counts,
            vec![
                (odin.clone(), "Detect".into(), 0),
                (odin, "DetectOne".into(), 0),
                (kserve.clone(), "ModelInfer".into(), 2),
                (kserve, "ModelStreamInfer".into(), 1),
            ]
        );
    }
}
