//! Spans and the per-frame recorder.
//!
//! Spans are made with the OpenTelemetry API directly rather than through
//! `tracing` spans: a frame's stages start and end on different threads (the
//! queue wait ends on an engine worker), and an OTel span builder takes
//! explicit start and end times, so each stage span is one cheap call made
//! when the stage is over, with timestamps from one monotonic clock (so
//! child durations add up inside their frame exactly).
//!
//! The pipeline sees one [`FrameRecorder`] per frame and calls it at stage
//! boundaries; whether that only bumps metrics or also makes spans is
//! decided here.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::{Link, Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use tracing::Instrument;

use super::metrics::{Metrics, Outcome, Rpc, Stage};
use crate::domain::Judgement;
use crate::error::Reason;

/// Everything recorded about one frame: each stage's duration into the
/// metrics and, when the frame is traced, its span with one child per stage.
/// Made by `Telemetry::frame` when the frame arrives.
#[derive(Debug)]
pub struct FrameRecorder {
    metrics: Arc<Metrics>,
    trace: Option<FrameTrace>,
    rpc: Rpc,
    arrived: Instant,
}

impl FrameRecorder {
    pub(super) fn new(
        metrics: Arc<Metrics>,
        trace: Option<FrameTrace>,
        rpc: Rpc,
        arrived: Instant,
    ) -> FrameRecorder {
        FrameRecorder {
            metrics,
            trace,
            rpc,
            arrived,
        }
    }

    /// When the frame arrived.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// Records a finished stage.
    pub fn stage(&self, stage: Stage, start: Instant, end: Instant) {
        self.metrics.stage(stage, end - start);
        if let Some(t) = &self.trace {
            t.stage(stage, start, end);
        }
    }

    /// Records the engine's part: the wait for a batch and the batch's run.
    /// Their spans are made by the engine worker, which knows the batch
    /// (see [`BatchTrace`]); only the metrics and the batch size are left.
    pub fn engine(&self, queued: Duration, compute: Duration, batch_size: usize) {
        self.metrics.stage(Stage::Queue, queued);
        self.metrics.stage(Stage::Batch, compute);
        if let Some(t) = &self.trace {
            t.set_attributes([KeyValue::new("odin.batch_size", batch_size as i64)]);
        }
    }

    /// The frame's span, for the engine worker to record its stages under.
    pub fn trace(&self) -> Option<FrameTrace> {
        self.trace.clone()
    }

    /// Runs `work` so that log lines written inside carry this frame's trace
    /// and span ids.
    pub async fn scope<F: Future>(&self, work: F) -> F::Output {
        match &self.trace {
            Some(t) => work.instrument(t.log_span("frame")).await,
            None => work.await,
        }
    }

    /// Notes how the frame ended, ready at `ready`. The returned guard
    /// records the respond stage and the end-to-end latency, and ends the
    /// span, when it is dropped: drop it once the answer is sent.
    pub fn finish(self, judgement: &Judgement, ready: Instant) -> FrameFinish {
        let (outcome, reason) = match &judgement.outcome {
            Ok(d) if d.in_distribution => (Outcome::In, None),
            Ok(_) => (Outcome::Out, None),
            Err(e) => (Outcome::Error, Some(e.reason())),
        };
        if let Some(t) = &self.trace {
            let mut attributes = vec![KeyValue::new("odin.verdict", outcome.name())];
            if let Some(applied) = &judgement.scoring {
                attributes.push(KeyValue::new(
                    "odin.method",
                    applied.scoring.method.as_str(),
                ));
            }
            match &judgement.outcome {
                Err(error) => t.fail(error.reason(), error.to_string()),
                Ok(d) => attributes.extend([
                    KeyValue::new("odin.score", f64::from(d.score)),
                    KeyValue::new(
                        "odin.threshold",
                        f64::from(judgement.scoring.map_or(0.0, |s| s.threshold)),
                    ),
                    KeyValue::new("odin.predicted_class", d.predicted_class as i64),
                    KeyValue::new("odin.label", d.label.clone()),
                ]),
            }
            t.set_attributes(attributes);
        }
        FrameFinish {
            recorder: self,
            ready,
            outcome,
            reason,
        }
    }
}

/// Records the respond stage, the frame's end-to-end latency and outcome,
/// and ends its span, when dropped: after the answer is sent, or when the
/// client goes away with it still pending.
#[derive(Debug)]
pub struct FrameFinish {
    recorder: FrameRecorder,
    ready: Instant,
    outcome: Outcome,
    reason: Option<Reason>,
}

impl Drop for FrameFinish {
    fn drop(&mut self) {
        let sent = Instant::now();
        let r = &self.recorder;
        r.stage(Stage::Respond, self.ready, sent);
        r.metrics
            .frame(r.rpc, sent - r.arrived, self.outcome, self.reason);
        if let Some(t) = &r.trace {
            t.end(sent);
        }
    }
}

/// Starts a frame span that began at `arrived`, as a child of `parent`.
/// `None` when the trace is not sampled.
pub(super) fn frame_span(
    tracer: &SdkTracer,
    parent: &Context,
    attributes: Vec<KeyValue>,
    arrived: Instant,
) -> Option<FrameTrace> {
    let span = tracer
        .span_builder("frame")
        .with_kind(SpanKind::Server)
        .with_start_time(wall(arrived))
        .with_attributes(attributes)
        .start_with_context(tracer, parent);
    if !span.span_context().is_sampled() {
        return None;
    }
    Some(FrameTrace {
        cx: parent.with_span(span),
        tracer: tracer.clone(),
    })
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
    pub fn fail(&self, reason: Reason, message: String) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", reason.as_str()));
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

/// One wall-clock reading paired with a monotonic one: every span timestamp
/// is derived from `Instant`s through it, so stage spans never overlap or
/// drift apart when the wall clock steps.
pub(super) fn anchor() -> (SystemTime, Instant) {
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
        let cx = super::super::propagation::from_fields(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        );
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
}
