//! Observability: an OpenTelemetry trace for every frame, the sidecar's
//! metrics (Prometheus text on `/metrics`), and log lines that carry the
//! trace and span ids of the frame they are about.
//!
//! One module per concern: `otlp` sets up export (with `export`, the
//! bounded span queue, and `push`, the metrics push), `propagation` reads
//! W3C trace context, `spans` makes spans and holds the per-frame
//! `FrameRecorder` the pipeline calls at stage boundaries, `metrics` is the
//! registry and `exposition` renders it as Prometheus text.
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
pub mod exposition;
pub mod metrics;
pub mod otlp;
pub mod propagation;
pub mod push;
pub mod spans;

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::domain::TraceFields;

pub use metrics::{Gauges, Metrics, Outcome, Rpc, Stage};
pub use otlp::{OtlpConfig, TelemetryError, DEFAULT_MAX_EXPORT_QUEUE};
pub use spans::{log_span, BatchTrace, FrameFinish, FrameRecorder, FrameTrace};

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
        spans::anchor();
        let (provider, push) = otlp::start(otlp, &metrics)?;
        let tracer = provider.tracer("odin-sidecar");
        Ok(Telemetry {
            metrics,
            push: Some(push),
            tracing: Some(Tracing {
                provider,
                tracer,
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
    pub fn caller_context(&self, metadata: &tonic::metadata::MetadataMap) -> Context {
        match &self.tracing {
            Some(_) => propagation::from_metadata(metadata),
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

    /// The recorder of a frame that arrived at `arrived` on `rpc`. Its span,
    /// when tracing is on and the trace is sampled, is a child of the
    /// frame's own trace context when it carries one, else of `parent` (the
    /// call's).
    pub fn frame(
        &self,
        parent: &Context,
        own: &TraceFields,
        rpc: Rpc,
        frame_id: &str,
        arrived: Instant,
    ) -> FrameRecorder {
        let trace = self.tracing.as_ref().and_then(|t| {
            let own_parent;
            let parent = if own.traceparent.is_empty() {
                parent
            } else {
                own_parent = propagation::from_fields(&own.traceparent, &own.tracestate);
                &own_parent
            };
            let mut attributes = Vec::with_capacity(8);
            attributes.extend([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", rpc.service()),
                KeyValue::new("rpc.method", rpc.name()),
                KeyValue::new("odin.frame_id", frame_id.to_string()),
            ]);
            attributes.extend(t.model.iter().cloned());
            spans::frame_span(&t.tracer, parent, attributes, arrived)
        });
        FrameRecorder::new(Arc::clone(&self.metrics), trace, rpc, arrived)
    }

    /// The tracer, for the engine workers' batch spans.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracing.as_ref().map(|t| &t.tracer)
    }
}
