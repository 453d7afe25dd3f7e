//! The export path of spans, bounded and counted: the SDK's batch span
//! processor (its own thread; never blocks the request path) behind a
//! processor that caps the spans waiting for export, and in front of the
//! OTLP exporter a wrapper that counts what was delivered and what was lost.
//!
//! The SDK's processor already drops spans when its queue is full, but it
//! only logs that; our cap makes every drop — queue full or export failed —
//! visible as `odin_spans_dropped_total`.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

use super::metrics::Metrics;

/// Spans ended and not yet through an export attempt, shared by the
/// processor (which adds) and the exporter (which subtracts).
#[derive(Debug, Default)]
struct Pending(AtomicUsize);

/// A span processor that drops (and counts) spans beyond `cap` waiting for
/// export, and otherwise hands them to the SDK's batch processor.
#[derive(Debug)]
pub struct BoundedProcessor {
    inner: BatchSpanProcessor,
    pending: Arc<Pending>,
    cap: usize,
    metrics: Arc<Metrics>,
}

impl BoundedProcessor {
    /// Wraps `exporter` in a batch processor exporting every
    /// `schedule_delay` at most `cap` spans at a time waiting.
    pub fn new<E>(
        exporter: E,
        cap: usize,
        schedule_delay: Option<Duration>,
        metrics: Arc<Metrics>,
    ) -> BoundedProcessor
    where
        E: SpanExporter + 'static,
    {
        let pending = Arc::new(Pending::default());
        let counted = CountingExporter {
            inner: exporter,
            pending: Arc::clone(&pending),
            metrics: Arc::clone(&metrics),
        };
        // The SDK's own queue is sized above our cap, so it never drops
        // silently: `pending` counts every span it holds.
        let mut config =
            opentelemetry_sdk::trace::BatchConfigBuilder::default().with_max_queue_size(cap + 1);
        if let Some(delay) = schedule_delay {
            config = config.with_scheduled_delay(delay);
        }
        let inner = BatchSpanProcessor::builder(counted)
            .with_batch_config(config.build())
            .build();
        BoundedProcessor {
            inner,
            pending,
            cap: cap.max(1),
            metrics,
        }
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.0.fetch_add(1, Ordering::Relaxed) >= self.cap {
            self.pending.0.fetch_sub(1, Ordering::Relaxed);
            self.metrics.spans_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts spans delivered and spans lost to failed exports.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        let pending = Arc::clone(&self.pending);
        let metrics = Arc::clone(&self.metrics);
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            pending.0.fetch_sub(n, Ordering::Relaxed);
            let counter = match result {
                Ok(()) => &metrics.spans_exported,
                Err(_) => &metrics.spans_dropped,
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
