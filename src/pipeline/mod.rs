//! The data path, as one straight line per frame:
//! receive → decode → batch → infer → score → respond.
//!
//! `Pipeline::judge` runs it for one frame; `order::drive` runs it for a
//! whole stream, keeping verdicts in frame order.

pub mod batch;
pub mod decode;
pub mod order;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::error::FrameError;
use crate::score::{self, Outputs, Scoring};
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
    ) -> Pipeline {
        Pipeline {
            preprocessor,
            decoders: Arc::new(Semaphore::new(decode_threads.max(1))),
            batcher,
            options,
            labels,
            in_flight: AtomicUsize::new(0),
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

    /// Judges one frame. Never fails: a bad frame gets an error verdict.
    pub async fn judge(self: Arc<Self>, frame: Frame) -> Verdict {
        let arrived = Instant::now();
        let _counted = InFlight::enter(&self.in_flight);
        let Frame {
            frame_id,
            image,
            attributes,
            scoring,
        } = frame;
        let mut verdict = Verdict {
            frame_id,
            attributes,
            ..Verdict::default()
        };
        let result = match self.resolve(scoring.as_ref()) {
            Ok((scoring, threshold)) => {
                self.run(image, scoring, threshold, arrived, &mut verdict)
                    .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            verdict.error = Some((&error).into());
        }
        let timings = verdict.timings.get_or_insert_with(Timings::default);
        timings.total_us = micros(arrived.elapsed());
        verdict
    }

    async fn run(
        self: &Arc<Self>,
        image: Option<crate::wire::frame::Image>,
        scoring: Scoring,
        threshold: f32,
        arrived: Instant,
        verdict: &mut Verdict,
    ) -> Result<(), FrameError> {
        verdict.method = scoring.method.to_string();
        verdict.temperature = scoring.temperature;
        verdict.epsilon = scoring.effective_epsilon();
        verdict.threshold = threshold;
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
        .map_err(|e| FrameError::Engine(format!("decode task failed: {e}")))??;
        let decoded = arrived.elapsed();
        let inference = self.batcher.infer(input, scoring.perturbation()).await?;
        self.score(&inference, scoring, verdict);
        verdict.timings = Some(Timings {
            decode_us: micros(decoded),
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

/// Counts a frame as in flight until dropped (also when its future is
/// cancelled mid-way).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
