//! The data path, as one straight line per frame:
//! receive → decode → batch → infer → score → respond.
//!
//! `Pipeline::judge` runs it for one frame; `order::drive` runs it for a
//! whole stream, keeping verdicts in frame order.
//!
//! Every stage is timed into the metrics and, when tracing is on, recorded
//! as a child span of the frame's span (see `crate::telemetry`).

pub mod batch;
pub mod decode;
pub mod order;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::{Context, KeyValue};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::error::FrameError;
use crate::score::{self, Outputs, Scoring};
use crate::telemetry::{FrameTrace, Gauges, Method, Outcome, Stage, Telemetry};
use crate::wire::{Frame, ScoringOverride, Timings, Verdict};

pub use batch::{BatchOptions, Batcher, Inference};
pub use decode::Preprocessor;

/// Scoring settings in force, and what frames may override.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringOptions {
    /// Method, temperature and ε of frames without an override.
    pub scoring: Scoring,
    /// Decision threshold δ: in-distribution iff score ≥ δ.
    pub threshold: f32,
    /// Bounds on per-frame overrides.
    pub bounds: OverrideBounds,
    /// Whether the gradient graph is loaded (ODIN and perturbed energy).
    pub can_perturb: bool,
}

/// The ranges a frame's scoring override must stay inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverrideBounds {
    /// Smallest temperature a frame may ask for.
    pub min_temperature: f32,
    /// Largest temperature a frame may ask for.
    pub max_temperature: f32,
    /// Largest ε a frame may ask for (the smallest is 0).
    pub max_epsilon: f32,
}

/// Everything needed to judge frames. Shared by all streams.
pub struct Pipeline {
    preprocessor: Preprocessor,
    // Bounds concurrent decodes: decoding runs on tokio's blocking pool, which
    // would otherwise grow a thread per waiting frame.
    decoders: Arc<Semaphore>,
    batcher: Batcher,
    options: ScoringOptions,
    labels: Vec<String>,
    in_flight: AtomicUsize,
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("options", &self.options)
            .finish()
    }
}

impl Pipeline {
    /// Assembles the pipeline from its stages.
    pub fn new(
        preprocessor: Preprocessor,
        batcher: Batcher,
        decode_threads: usize,
        options: ScoringOptions,
        labels: Vec<String>,
        telemetry: Arc<Telemetry>,
    ) -> Pipeline {
        Pipeline {
            preprocessor,
            decoders: Arc::new(Semaphore::new(decode_threads.max(1))),
            batcher,
            options,
            labels,
            in_flight: AtomicUsize::new(0),
            telemetry,
        }
    }

    /// Metrics and tracing of this pipeline.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// The gauges `/metrics` reports, read now.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.queued() as u64,
            in_flight: self.in_flight() as u64,
        }
    }

    /// Frames received and not yet answered, over all streams and calls.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The scoring settings in force.
    pub fn options(&self) -> ScoringOptions {
        self.options
    }

    /// The scoring and threshold for one frame: the server's, or the frame's
    /// override when it is valid and inside the bounds.
    pub fn resolve(&self, over: Option<&ScoringOverride>) -> Result<(Scoring, f32), FrameError> {
        let mut scoring = self.options.scoring;
        let Some(over) = over else {
            return Ok((scoring, self.options.threshold));
        };
        if !over.method.is_empty() {
            scoring.method = over
                .method
                .parse()
                .map_err(|_| FrameError::UnknownMethod(over.method.clone()))?;
        }
        let bounds = self.options.bounds;
        let check = |field, value: f32, min: f32, max: f32| {
            if value.is_finite() && value >= min && value <= max {
                Ok(value)
            } else {
                Err(FrameError::OverrideOutOfBounds {
                    field,
                    value,
                    min,
                    max,
                })
            }
        };
        if let Some(t) = over.temperature {
            scoring.temperature = check(
                "temperature",
                t,
                bounds.min_temperature,
                bounds.max_temperature,
            )?;
        }
        if let Some(e) = over.epsilon {
            scoring.epsilon = check("epsilon", e, 0.0, bounds.max_epsilon)?;
        }
        if scoring.perturbation().is_some() && !self.options.can_perturb {
            return Err(FrameError::PerturbationUnavailable(
                scoring.method.to_string(),
            ));
        }
        let threshold = match over.threshold {
            Some(t) => check("threshold", t, f32::MIN, f32::MAX)?,
            None => self.options.threshold,
        };
        Ok((scoring, threshold))
    }

    /// Frames waiting for an engine worker.
    pub fn queued(&self) -> usize {
        self.batcher.queued()
    }

    /// Judges one frame in-process. Never fails: a bad frame gets an error
    /// verdict.
    pub async fn judge(self: Arc<Self>, frame: Frame) -> Verdict {
        self.judge_traced(frame, &Context::new(), Method::InProcess)
            .await
            .verdict
    }

    /// Judges one frame that came on `method`, tracing it as a child of the
    /// frame's own `traceparent` or else of `parent` (the call's context).
    /// The answer's frame span and end-to-end latency close when it is
    /// dropped: drop it once the verdict is sent.
    pub async fn judge_traced(
        self: Arc<Self>,
        frame: Frame,
        parent: &Context,
        method: Method,
    ) -> Answer {
        let arrived = Instant::now();
        let counted = InFlight::enter(Arc::clone(&self));
        let Frame {
            frame_id,
            image,
            attributes,
            scoring,
            traceparent,
            tracestate,
        } = frame;
        let trace = self.telemetry.frame(
            parent,
            &traceparent,
            &tracestate,
            method,
            &frame_id,
            arrived,
        );
        let mut verdict = Verdict {
            frame_id,
            attributes,
            ..Verdict::default()
        };
        let resolved = self.resolve(scoring.as_ref());
        let received = Instant::now();
        self.stage(trace.as_ref(), Stage::Receive, arrived, received);
        let result = match resolved {
            Ok((scoring, threshold)) => {
                let run = self.run(image, scoring, threshold, &trace, &mut verdict);
                match &trace {
                    // Log lines of this frame carry its trace and span ids.
                    Some(t) => run.instrument(t.log_span("frame")).await,
                    None => run.await,
                }
            }
            Err(error) => Err(error),
        };
        let ready = Instant::now();
        let error = result.err();
        if let Some(error) = &error {
            verdict.error = Some(error.into());
        }
        let timings = verdict.timings.get_or_insert_with(Timings::default);
        timings.total_us = micros(ready - arrived);
        let outcome = match (&error, verdict.in_distribution) {
            (Some(_), _) => Outcome::Error,
            (None, true) => Outcome::In,
            (None, false) => Outcome::Out,
        };
        if let Some(t) = &trace {
            let mut attributes = vec![
                KeyValue::new("odin.method", verdict.method.clone()),
                KeyValue::new("odin.verdict", outcome.name()),
            ];
            match &error {
                Some(error) => t.fail(error.reason(), error.to_string()),
                None => attributes.extend([
                    KeyValue::new("odin.score", f64::from(verdict.score)),
                    KeyValue::new("odin.threshold", f64::from(verdict.threshold)),
                    KeyValue::new("odin.predicted_class", i64::from(verdict.predicted_class)),
                    KeyValue::new("odin.label", verdict.label.clone()),
                ]),
            }
            t.set_attributes(attributes);
        }
        Answer {
            verdict,
            finish: Finish {
                pipeline: Arc::clone(&self),
                method,
                arrived,
                ready,
                outcome,
                reason: error.as_ref().map(FrameError::reason),
                trace,
                _counted: counted,
            },
        }
    }

    fn stage(&self, trace: Option<&FrameTrace>, stage: Stage, start: Instant, end: Instant) {
        self.telemetry.metrics().stage(stage, end - start);
        if let Some(t) = trace {
            t.stage(stage, start, end);
        }
    }

    async fn run(
        self: &Arc<Self>,
        image: Option<crate::wire::frame::Image>,
        scoring: Scoring,
        threshold: f32,
        trace: &Option<FrameTrace>,
        verdict: &mut Verdict,
    ) -> Result<(), FrameError> {
        verdict.method = scoring.method.to_string();
        verdict.temperature = scoring.temperature;
        verdict.epsilon = scoring.effective_epsilon();
        verdict.threshold = threshold;
        let decode_start = Instant::now();
        // Decoding can take milliseconds for large JPEGs: keep it off the
        // async runtime's threads.
        let permit = Arc::clone(&self.decoders)
            .acquire_owned()
            .await
            .map_err(|_| FrameError::Unavailable)?;
        let this = Arc::clone(self);
        let input = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.preprocessor.tensor(image.as_ref())
        })
        .await
        .map_err(|e| FrameError::Engine(format!("decode task failed: {e}")))?;
        let decoded = Instant::now();
        self.stage(trace.as_ref(), Stage::Decode, decode_start, decoded);
        let input = input?;
        // The worker records the queue and batch spans; their metrics are
        // recorded here, from the durations it reports.
        let inference = self
            .batcher
            .infer(input, scoring.perturbation(), trace.clone())
            .await?;
        let metrics = self.telemetry.metrics();
        metrics.stage(Stage::Queue, inference.queued);
        metrics.stage(Stage::Batch, inference.compute);
        let score_start = Instant::now();
        self.score(&inference, scoring, verdict);
        if let Some(t) = trace {
            t.set_attributes([KeyValue::new(
                "odin.batch_size",
                inference.batch_size as i64,
            )]);
        }
        self.stage(trace.as_ref(), Stage::Score, score_start, Instant::now());
        verdict.timings = Some(Timings {
            decode_us: micros(decoded - decode_start),
            queue_us: micros(inference.queued),
            inference_us: micros(inference.compute),
            total_us: 0,
        });
        Ok(())
    }

    fn score(&self, inference: &Inference, scoring: Scoring, verdict: &mut Verdict) {
        let logits = &inference.logits;
        let class = score::argmax(logits);
        verdict.score = scoring.score(Outputs {
            logits,
            perturbed: inference.perturbed_logits.as_deref(),
        });
        verdict.in_distribution = verdict.score >= verdict.threshold;
        verdict.predicted_class = class as i32;
        verdict.label = self.labels.get(class).cloned().unwrap_or_default();
        verdict.max_softmax = score::max_softmax(logits, 1.0);
    }
}

/// A frame's verdict, and the bookkeeping that closes when it is sent.
#[derive(Debug)]
pub struct Answer {
    /// The verdict to send.
    pub verdict: Verdict,
    /// Dropped once the verdict is sent (or abandoned).
    pub finish: Finish,
}

/// Records the respond stage, the frame's end-to-end latency and outcome,
/// and ends its span, when dropped: after the verdict is sent, or when the
/// stream goes away with it still pending.
pub struct Finish {
    pipeline: Arc<Pipeline>,
    method: Method,
    arrived: Instant,
    ready: Instant,
    outcome: Outcome,
    reason: Option<&'static str>,
    trace: Option<FrameTrace>,
    _counted: InFlight,
}

impl std::fmt::Debug for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finish")
            .field("method", &self.method)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let sent = Instant::now();
        let metrics = self.pipeline.telemetry.metrics();
        metrics.stage(Stage::Respond, sent - self.ready);
        metrics.frame(self.method, sent - self.arrived, self.outcome, self.reason);
        if let Some(t) = &self.trace {
            t.stage(Stage::Respond, self.ready, sent);
            t.end(sent);
        }
    }
}

/// Counts a frame as in flight until dropped (also when its future is
/// cancelled mid-way).
struct InFlight(Arc<Pipeline>);

impl InFlight {
    fn enter(pipeline: Arc<Pipeline>) -> InFlight {
        pipeline.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(pipeline)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
