//! The data path, as one straight line per frame:
//! receive → decode → batch → infer → score → respond.
//!
//! `Pipeline::judge` runs it for one frame and returns its `Judgement`;
//! `order::drive` runs it for a whole stream, keeping answers in frame
//! order. The pipeline speaks only the core's own types (`crate::domain`);
//! each protocol converts at its edge. It tells its `FrameRecorder` (see
//! `crate::telemetry`) when each stage ends; what that records is the
//! recorder's business.

pub mod batch;
pub mod decode;
pub mod order;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use opentelemetry::Context;
use tokio::sync::Semaphore;

use crate::domain::{
    AppliedScoring, Decision, FrameRequest, ImageInput, Judgement, ScoringRequest, Timings,
};
use crate::error::FrameError;
use crate::score::{self, Outputs, Scoring};
use crate::telemetry::{FrameFinish, FrameRecorder, Gauges, Rpc, Stage, Telemetry};

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

/// A frame's judgement, and the bookkeeping that closes when it is sent.
#[derive(Debug)]
pub struct Answer {
    /// The judgement to send.
    pub judgement: Judgement,
    /// Drop it once the judgement is sent (or abandoned): that ends the
    /// frame's respond stage, its span and its in-flight count.
    pub finish: Finish,
}

/// See [`Answer::finish`].
#[derive(Debug)]
pub struct Finish {
    _recorded: FrameFinish,
    _counted: InFlight,
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

    /// Frames waiting for an engine worker.
    pub fn queued(&self) -> usize {
        self.batcher.queued()
    }

    /// The scoring settings in force.
    pub fn options(&self) -> ScoringOptions {
        self.options
    }

    /// The scoring and threshold for one frame: the server's, or the frame's
    /// override when it is valid and inside the bounds.
    pub fn resolve(&self, over: Option<&ScoringRequest>) -> Result<AppliedScoring, FrameError> {
        let mut scoring = self.options.scoring;
        let Some(over) = over else {
            return Ok(AppliedScoring {
                scoring,
                threshold: self.options.threshold,
            });
        };
        if let Some(method) = &over.method {
            scoring.method = method
                .parse()
                .map_err(|_| FrameError::UnknownMethod(method.clone()))?;
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
        Ok(AppliedScoring { scoring, threshold })
    }

    /// Judges one frame that came on `rpc`. Never fails: a bad frame gets a
    /// judgement carrying its error. `parent` is the call's trace context,
    /// the parent of frames that carry none of their own.
    pub async fn judge(
        self: Arc<Self>,
        request: FrameRequest,
        parent: &Context,
        rpc: Rpc,
    ) -> Answer {
        let arrived = Instant::now();
        let counted = InFlight::enter(Arc::clone(&self));
        let recorder = self
            .telemetry
            .frame(parent, &request.trace, rpc, &request.id, arrived);
        let FrameRequest {
            id,
            image,
            attributes,
            scoring,
            ..
        } = request;
        // Receive: the frame's own scoring, checked against the bounds.
        let applied = self.resolve(scoring.as_ref());
        let in_force = applied.as_ref().ok().copied();
        recorder.stage(Stage::Receive, arrived, Instant::now());
        let mut timings = Timings::default();
        let outcome = match applied {
            Ok(applied) => {
                recorder
                    .scope(self.run(image, applied, &recorder, &mut timings))
                    .await
            }
            Err(error) => Err(error),
        };
        let ready = Instant::now();
        timings.total = ready - arrived;
        let judgement = Judgement {
            frame_id: id,
            attributes,
            scoring: in_force,
            outcome,
            timings,
        };
        let recorded = recorder.finish(&judgement, ready);
        Answer {
            judgement,
            finish: Finish {
                _recorded: recorded,
                _counted: counted,
            },
        }
    }

    /// Decode → batch and infer → score, for a frame whose scoring is valid.
    async fn run(
        self: &Arc<Self>,
        image: Option<ImageInput>,
        applied: AppliedScoring,
        recorder: &FrameRecorder,
        timings: &mut Timings,
    ) -> Result<Decision, FrameError> {
        let started = Instant::now();
        let input = self.decode(image).await;
        let decoded = Instant::now();
        recorder.stage(Stage::Decode, started, decoded);
        timings.decode = decoded - started;
        let input = input?;

        let perturbation = applied.scoring.perturbation();
        let inference = self
            .batcher
            .infer(input, perturbation, recorder.trace())
            .await?;
        recorder.engine(inference.queued, inference.compute, inference.batch_size);
        timings.queue = inference.queued;
        timings.inference = inference.compute;

        let scored = Instant::now();
        let decision = self.score(inference, applied);
        recorder.stage(Stage::Score, scored, Instant::now());
        Ok(decision)
    }

    /// Decodes on the blocking pool, a bounded number at a time: a large
    /// JPEG takes milliseconds, which must not block the async runtime.
    async fn decode(self: &Arc<Self>, image: Option<ImageInput>) -> Result<Vec<f32>, FrameError> {
        let permit = Arc::clone(&self.decoders)
            .acquire_owned()
            .await
            .map_err(|_| FrameError::Unavailable)?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.preprocessor.tensor(image.as_ref())
        })
        .await
        .map_err(|e| FrameError::Internal(format!("decode task failed: {e}")))?
    }

    fn score(&self, inference: Inference, applied: AppliedScoring) -> Decision {
        let Inference {
            logits,
            perturbed_logits,
            ..
        } = inference;
        let class = score::argmax(&logits);
        let value = applied.scoring.score(Outputs {
            logits: &logits,
            perturbed: perturbed_logits.as_deref(),
        });
        Decision {
            score: value,
            in_distribution: value >= applied.threshold,
            predicted_class: class,
            label: self.labels.get(class).cloned().unwrap_or_default(),
            max_softmax: score::max_softmax(&logits, 1.0),
            logits,
        }
    }
}

/// Counts a frame as in flight until dropped (also when its future is
/// cancelled mid-way).
#[derive(Debug)]
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

#[cfg(test)]
mod tests;
