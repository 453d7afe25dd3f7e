//! The data path, as one straight line per frame:
//! receive → decode → batch → infer → score → respond.
//!
//! `Pipeline::judge` runs it for one frame; `order::drive` runs it for a
//! whole stream, keeping verdicts in frame order.

pub mod batch;
pub mod decode;
pub mod order;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::FrameError;
use crate::score::{self, Method, Scorer};
use crate::wire::{Frame, Timings, Verdict};

pub use batch::{BatchOptions, Batcher, Inference};
pub use decode::Preprocessor;

/// Scoring settings in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoringOptions {
    /// Method.
    pub method: Method,
    /// Temperature T.
    pub temperature: f32,
    /// Decision threshold δ: in-distribution iff score ≥ δ.
    pub threshold: f32,
}

/// Everything needed to judge frames. Shared by all streams.
pub struct Pipeline {
    preprocessor: Preprocessor,
    batcher: Batcher,
    scorer: Box<dyn Scorer>,
    scoring: ScoringOptions,
    labels: Vec<String>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("scoring", &self.scoring)
            .finish()
    }
}

impl Pipeline {
    /// Assembles the pipeline from its stages.
    pub fn new(
        preprocessor: Preprocessor,
        batcher: Batcher,
        scoring: ScoringOptions,
        labels: Vec<String>,
    ) -> Pipeline {
        Pipeline {
            preprocessor,
            batcher,
            scorer: score::scorer(scoring.method, scoring.temperature),
            scoring,
            labels,
        }
    }

    /// The scoring settings in force.
    pub fn scoring(&self) -> ScoringOptions {
        self.scoring
    }

    /// Frames waiting for an engine worker.
    pub fn queued(&self) -> usize {
        self.batcher.queued()
    }

    /// Judges one frame. Never fails: a bad frame gets an error verdict.
    pub async fn judge(self: Arc<Self>, frame: Frame) -> Verdict {
        let arrived = Instant::now();
        let Frame {
            frame_id,
            image,
            attributes,
        } = frame;
        let mut verdict = Verdict {
            frame_id,
            attributes,
            method: self.scoring.method.to_string(),
            threshold: self.scoring.threshold,
            ..Verdict::default()
        };
        match self.run(image, arrived, &mut verdict).await {
            Ok(()) => {}
            Err(error) => verdict.error = Some((&error).into()),
        }
        let timings = verdict.timings.get_or_insert_with(Timings::default);
        timings.total_us = micros(arrived.elapsed());
        verdict
    }

    async fn run(
        self: &Arc<Self>,
        image: Option<crate::wire::frame::Image>,
        arrived: Instant,
        verdict: &mut Verdict,
    ) -> Result<(), FrameError> {
        // Decoding can take milliseconds for large JPEGs: keep it off the
        // async runtime's threads.
        let this = Arc::clone(self);
        let input = tokio::task::spawn_blocking(move || this.preprocessor.tensor(image.as_ref()))
            .await
            .map_err(|e| FrameError::Engine(format!("decode task failed: {e}")))??;
        let decoded = arrived.elapsed();
        let inference = self.batcher.infer(input).await?;
        self.score(&inference, verdict);
        verdict.timings = Some(Timings {
            decode_us: micros(decoded),
            queue_us: micros(inference.queued),
            inference_us: micros(inference.compute),
            total_us: 0,
        });
        Ok(())
    }

    fn score(&self, inference: &Inference, verdict: &mut Verdict) {
        let logits = &inference.logits;
        let class = score::argmax(logits);
        verdict.score = self.scorer.score(logits);
        verdict.in_distribution = verdict.score >= self.scoring.threshold;
        verdict.predicted_class = class as i32;
        verdict.label = self.labels.get(class).cloned().unwrap_or_default();
        verdict.max_softmax = score::max_softmax(logits, 1.0);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
