//! OTLP export set-up: the span exporter behind a bounded queue, the
//! resource, and the metrics push, configured by `OtlpConfig` and the
//! standard `OTEL_*` variables.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use super::{export, push, Metrics};

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

/// The span provider and the metrics push for `otlp`. Must run inside a
/// tokio runtime: the exporter's channel lives on it.
pub(super) fn start(
    otlp: &OtlpConfig,
    metrics: &Arc<Metrics>,
) -> Result<(SdkTracerProvider, push::Push), TelemetryError> {
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
        Arc::clone(metrics),
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
    Ok((builder.build(), push))
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
