//! Observability: an OpenTelemetry trace for every frame, the sidecar's
//! metrics (Prometheus text on `/metrics`), and log lines that carry the
//! trace and span ids of the frame they are about.
//!
//! Spans are made with the OpenTelemetry API directly rather than through
//! `tracing` spans: a frame's stages start and end on different threads (the
//! queue wait ends on an engine worker), and an OTel span builder takes
//! explicit start and end times, so each stage span is one cheap call made
//! when the stage is over, with timestamps from one monotonic clock (so
//! child durations add up inside their frame exactly).
//!
//! The span tree of one frame (names as exported):
//!
//! ```text
//! frame                      SERVER, child of the caller's span (traceparent)
//! ├── receive                scoring override and trace context read
//! ├── decode                 waiting for a decoder + decode/preprocess
//! ├── queue                  waiting in the engine queue for its batch
//! ├── batch                  the engine run that carried it (links to ↓)
//! ├── score                  logits → score → verdict
//! └── respond                waiting for earlier frames of the stream + send
//!
//! engine.batch               one per engine run, links to every frame span
//! ├── gradient               the ODIN gradient graph G (perturbed runs only)
//! └── forward                the model on the (perturbed) batch
//! ```
//!
//! With tracing off (the default) nothing here allocates per frame; the
//! metrics are always kept, as relaxed atomic adds.

pub mod export;
pub mod http;
pub mod metrics;
pub mod push;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use metrics::{Gauges, Method, Metrics, Outcome, Stage};

/// Spans that may wait for export before new ones are dropped (and counted).
pub const DEFAULT_MAX_EXPORT_QUEUE: usize = 8192;

/// How spans are exported, when they are. The default leaves everything
/// to the standard `OTEL_*` variables.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint. `None` leaves it to
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (default `http://localhost:4317`).
    pub endpoint: Option<String>,
    /// Sample every trace, whatever `OTEL_TRACES_SAMPLER` says (tests and
    /// benchmarks). Otherwise the SDK reads `OTEL_TRACES_SAMPLER`/`_ARG`
    /// (default `parentbased_always_on`).
    pub always_on: bool,
    /// Spans that may wait for export; beyond it new spans are dropped.
    /// `None` reads `OTEL_BSP_MAX_QUEUE_SIZE` (default 8192).
    pub max_queue: Option<usize>,
    /// How often batches are exported; `None` reads `OTEL_BSP_SCHEDULE_DELAY`
    /// (default 5 s).
    pub schedule_delay: Option<Duration>,
    /// How often metrics are pushed; `None` reads
    /// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds, default 60 s).
    pub metrics_interval: Option<Duration>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// What the frame spans say about the model that judged them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedModel {
    /// Model name from its card.
    pub name: String,
    /// Model version from its card.
    pub version: String,
    /// ONNX Runtime execution provider.
    pub provider: String,
}

/// Metrics, and the tracer when tracing is on. One per `App`.
#[derive(Debug)]
pub struct Telemetry {
    metrics: Arc<Metrics>,
    tracing: Option<Tracing>,
    push: Option<push::Push>,
}

#[derive(Debug)]
struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    model: Vec<KeyValue>,
}

impl Telemetry {
    /// Metrics only: no spans are made.
    pub fn metrics_only() -> Telemetry {
        Telemetry {
            metrics: Arc::new(Metrics::default()),
            tracing: None,
            push: None,
        }
    }

    /// Metrics, and spans exported over OTLP/gRPC as `otlp` says. The
    /// resource comes from `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
    /// (service name `odin-sidecar` unless set). Must run inside a tokio
    /// runtime: the exporter's channel lives on it.
    pub fn start(
        otlp: Option<&OtlpConfig>,
        model: &ServedModel,
    ) -> Result<Telemetry, TelemetryError> {
        let metrics = Arc::new(Metrics::default());
        let Some(otlp) = otlp else {
            return Ok(Telemetry {
                metrics,
                tracing: None,
                push: None,
            });
        };
        anchor();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        if let Some(endpoint) = &otlp.endpoint {
            exporter = exporter.with_endpoint(endpoint.clone());
        }
        let exporter = exporter
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let processor = export::BoundedProcessor::new(
            exporter,
            otlp.max_queue.unwrap_or_else(max_queue),
            otlp.schedule_delay,
            Arc::clone(&metrics),
        );
        // The default resource detectors read OTEL_SERVICE_NAME and
        // OTEL_RESOURCE_ATTRIBUTES; ours only fills in a missing name.
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none()
            && !std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                .unwrap_or_default()
                .contains("service.name=")
        {
            resource = resource.with_service_name("odin-sidecar");
        }
        let resource = resource.build();
        let push = push::Push {
            endpoint: metrics_endpoint(otlp.endpoint.as_deref()),
            interval: otlp.metrics_interval.unwrap_or_else(metrics_interval),
            resource: resource
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mut builder = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource);
        if otlp.always_on {
            builder = builder.with_sampler(Sampler::AlwaysOn);
        }
        let provider = builder.build();
        let tracer = provider.tracer("odin-sidecar");
        Ok(Telemetry {
            metrics,
            push: Some(push),
            tracing: Some(Tracing {
                provider,
                tracer,
                propagator: TraceContextPropagator::new(),
                // Shared strings: every frame span clones these.
                model: vec![
                    KeyValue::new("odin.model.name", Arc::<str>::from(model.name.as_str())),
                    KeyValue::new(
                        "odin.model.version",
                        Arc::<str>::from(model.version.as_str()),
                    ),
                    KeyValue::new(
                        "odin.execution_provider",
                        Arc::<str>::from(model.provider.as_str()),
                    ),
                ],
            }),
        })
    }

    /// Starts pushing the metrics over OTLP, when OTLP is on; `gauges` reads
    /// the instantaneous values at each push, and stops the pushes by
    /// returning `None` (the pipeline is gone). Must run inside a tokio runtime.
    pub fn spawn_metrics_push<G>(&self, gauges: G)
    where
        G: Fn() -> Option<Gauges> + Send + 'static,
    {
        if let Some(push) = &self.push {
            tokio::spawn(push::run(push.clone(), Arc::clone(&self.metrics), gauges));
        }
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether spans are made.
    pub fn tracing(&self) -> bool {
        self.tracing.is_some()
    }

    /// The caller's trace context from W3C `traceparent`/`tracestate` gRPC
    /// metadata; an empty context when absent or when tracing is off.
    pub fn extract_metadata(&self, metadata: &tonic::metadata::MetadataMap) -> Context {
        match &self.tracing {
            Some(t) => t.propagator.extract(&MetadataExtractor(metadata)),
            None => Context::new(),
        }
    }

    /// Exports what is queued now; for tests and shutdown.
    pub fn flush(&self) {
        if let Some(t) = &self.tracing {
            if let Err(e) = t.provider.force_flush() {
                tracing::debug!(error = %e, "span flush failed");
            }
        }
    }

    /// Flushes and stops the exporter. Blocks up to a few seconds: call it
    /// off the async runtime's threads.
    pub fn shutdown(&self) {
        if let Some(t) = &self.tracing {
            if let Err(e) = t.provider.shutdown() {
                tracing::debug!(error = %e, "span exporter shutdown");
            }
        }
    }

    /// Starts the span of a frame that arrived at `arrived`, as a child of
    /// the frame's own `traceparent` when it carries one, else of `parent`
    /// (the call's). `None` when tracing is off or the trace is not sampled.
    pub fn frame(
        &self,
        parent: &Context,
        traceparent: &str,
        tracestate: &str,
        method: Method,
        frame_id: &str,
        arrived: Instant,
    ) -> Option<FrameTrace> {
        let t = self.tracing.as_ref()?;
        let own;
        let parent = if traceparent.is_empty() {
            parent
        } else {
            own = t.propagator.extract(&FrameExtractor {
                traceparent,
                tracestate,
            });
            &own
        };
        let mut attributes = Vec::with_capacity(8);
        attributes.extend([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", "odin.v1.Detector"),
            KeyValue::new("rpc.method", method.name()),
            KeyValue::new("odin.frame_id", frame_id.to_string()),
        ]);
        attributes.extend(t.model.iter().cloned());
        let span = t
            .tracer
            .span_builder("frame")
            .with_kind(SpanKind::Server)
            .with_start_time(wall(arrived))
            .with_attributes(attributes)
            .start_with_context(&t.tracer, parent);
        if !span.span_context().is_sampled() {
            return None;
        }
        Some(FrameTrace {
            cx: parent.with_span(span),
            tracer: t.tracer.clone(),
        })
    }

    /// The tracer, for the engine workers' batch spans.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracing.as_ref().map(|t| &t.tracer)
    }
}

/// One frame's span, handed from stage to stage (and across threads, inside
/// the batcher's job).
#[derive(Debug, Clone)]
pub struct FrameTrace {
    cx: Context,
    tracer: SdkTracer,
}

impl FrameTrace {
    /// The context holding the frame span: parent of its stage spans.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Records a finished stage as a child span.
    pub fn stage(&self, stage: Stage, start: Instant, end: Instant) {
        self.child(stage, start, end, Vec::new(), Vec::new());
    }

    /// Records a finished stage with attributes and links.
    pub fn child(
        &self,
        stage: Stage,
        start: Instant,
        end: Instant,
        attributes: Vec<KeyValue>,
        links: Vec<Link>,
    ) {
        let mut span = self
            .tracer
            .span_builder(stage.name())
            .with_start_time(wall(start))
            .with_attributes(attributes)
            .with_links(links)
            .start_with_context(&self.tracer, &self.cx);
        span.end_with_timestamp(wall(end));
    }

    /// Sets attributes on the frame span.
    pub fn set_attributes(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attributes);
    }

    /// Marks the frame failed with `reason` (a stable `FrameError` reason).
    pub fn fail(&self, reason: &'static str, message: String) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", reason));
        span.set_status(Status::error(message));
    }

    /// Ends the frame span at `end`.
    pub fn end(&self, end: Instant) {
        self.cx.span().end_with_timestamp(wall(end));
    }

    /// A `tracing` span carrying this frame's trace and span ids, so log
    /// lines written while it is entered can be found from the trace.
    pub fn log_span(&self, name: &'static str) -> tracing::Span {
        log_span(name, &self.cx)
    }
}

/// A `tracing` span named `name` with `trace_id` and `span_id` fields of the
/// span in `cx`, so log lines inside carry them (human and JSON format).
pub fn log_span(name: &'static str, cx: &Context) -> tracing::Span {
    let span = cx.span();
    let sc = span.span_context();
    tracing::info_span!(
        "otel",
        otel.name = name,
        trace_id = %sc.trace_id(),
        span_id = %sc.span_id()
    )
}

/// The engine worker's side of a batch: makes the `engine.batch` span and
/// the frames' `queue` and `batch` spans once the run is over.
#[derive(Debug)]
pub struct BatchTrace<'a> {
    /// The tracer.
    pub tracer: &'a SdkTracer,
    /// When the batch started running.
    pub started: Instant,
    /// When it finished.
    pub ended: Instant,
    /// Time in the gradient graph, for perturbed batches.
    pub gradient: Option<Duration>,
    /// Time in the forward run.
    pub forward: Duration,
    /// The error, when the run failed.
    pub error: Option<String>,
    /// Execution provider.
    pub provider: String,
}

impl BatchTrace<'_> {
    /// Records the batch span (linked to every sampled frame in it) with its
    /// gradient and forward children, and each frame's queue and batch
    /// stages. `frames` are the sampled frames' traces with their enqueue times.
    pub fn record<'f>(
        &self,
        frames: impl Iterator<Item = (&'f FrameTrace, Instant)> + Clone,
        size: usize,
    ) {
        let links: Vec<Link> = frames
            .clone()
            .map(|(f, _)| Link::with_context(f.cx.span().span_context().clone()))
            .collect();
        if links.is_empty() {
            return;
        }
        let batch_size = KeyValue::new("odin.batch_size", size as i64);
        let mut span = self
            .tracer
            .span_builder("engine.batch")
            .with_start_time(wall(self.started))
            .with_attributes(vec![
                batch_size.clone(),
                KeyValue::new("odin.perturbed", self.gradient.is_some()),
                KeyValue::new("odin.execution_provider", self.provider.clone()),
            ])
            .with_links(links)
            // A batch serves many traces: it is a root, found through its links.
            .start_with_context(self.tracer, &Context::new());
        let batch_context = span.span_context().clone();
        let cx = Context::new().with_remote_span_context(batch_context.clone());
        let mut at = self.started;
        if let Some(g) = self.gradient {
            self.run_span(&cx, "gradient", at, at + g);
            at += g;
        }
        self.run_span(&cx, "forward", at, (at + self.forward).min(self.ended));
        if let Some(error) = &self.error {
            span.set_status(Status::error(error.clone()));
        }
        span.end_with_timestamp(wall(self.ended));
        for (frame, enqueued) in frames {
            frame.stage(Stage::Queue, enqueued, self.started);
            frame.child(
                Stage::Batch,
                self.started,
                self.ended,
                vec![batch_size.clone()],
                vec![Link::with_context(batch_context.clone())],
            );
        }
    }

    fn run_span(&self, cx: &Context, name: &'static str, start: Instant, end: Instant) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_start_time(wall(start))
            .start_with_context(self.tracer, cx);
        span.end_with_timestamp(wall(end));
    }
}

/// The OTLP/gRPC endpoint for metrics: the configured one, else the
/// standard variables, else the OTLP default.
fn metrics_endpoint(configured: Option<&str>) -> String {
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    configured
        .map(str::to_string)
        .or_else(|| env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_else(|| "http://localhost:4317".to_string())
}

/// `OTEL_BSP_MAX_QUEUE_SIZE`, or our default (four times the SDK's 2048:
/// a burst of frames makes seven spans each).
fn max_queue() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_EXPORT_QUEUE)
}

/// `OTEL_METRIC_EXPORT_INTERVAL` (milliseconds), or the default.
fn metrics_interval() -> Duration {
    std::env::var("OTEL_METRIC_EXPORT_INTERVAL")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(push::DEFAULT_INTERVAL)
}

/// One wall-clock reading paired with a monotonic one: every span timestamp
/// is derived from `Instant`s through it, so stage spans never overlap or
/// drift apart when the wall clock steps.
fn anchor() -> (SystemTime, Instant) {
    static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    *ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// The wall-clock time of `at`.
fn wall(at: Instant) -> SystemTime {
    let (system, instant) = anchor();
    match at.checked_duration_since(instant) {
        Some(after) => system + after,
        None => system - instant.duration_since(at),
    }
}

/// Reads `traceparent`/`tracestate` from gRPC metadata.
struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Reads a frame's own `traceparent`/`tracestate` fields.
struct FrameExtractor<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for FrameExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent),
            "tracestate" if !self.tracestate.is_empty() => Some(self.tracestate),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_follows_the_monotonic_clock() {
        let a = Instant::now();
        let b = a + Duration::from_millis(5);
        let d = wall(b).duration_since(wall(a)).expect("ordered");
        assert_eq!(d, Duration::from_millis(5));
    }

    #[test]
    fn log_lines_inside_a_frame_carry_its_trace_and_span_ids() {
        use std::sync::Mutex;
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut lines) = self.0.lock() {
                    lines.extend_from_slice(buf);
                }
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        let cx = TraceContextPropagator::new().extract(&FrameExtractor {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            tracestate: "",
        });
        tracing::subscriber::with_default(subscriber, || {
            let _frame = log_span("frame", &cx).entered();
            tracing::warn!("something about this frame");
        });
        let text = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["span"]["span_id"], "00f067aa0ba902b7");
        assert_eq!(line["span"]["otel.name"], "frame");
    }

    #[test]
    fn a_frame_traceparent_is_extracted() {
        let p = TraceContextPropagator::new();
        let cx = p.extract(&FrameExtractor {
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            tracestate: "",
        });
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote());
    }
}
