//! Resolved configuration of a serving sidecar, with its defaults.
//!
//! The CLI (`cli::serve`) parses flags into a `ServeConfig`; tests build one
//! directly, so nothing here reads the process environment.

use std::time::Duration;

use crate::engine::{Device, EngineOptions};
use crate::model::ModelSource;
use crate::pipeline::{order, BatchOptions, OverrideBounds};
use crate::score::Method;
use crate::telemetry::OtlpConfig;

/// Address `serve` listens on by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";
/// Largest batch handed to one engine run.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Longest a frame waits for others to share its batch.
pub const DEFAULT_MAX_QUEUE_DELAY: Duration = Duration::ZERO;
/// Frames that may wait for an engine worker before submitters are held back.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// Engine worker threads (one pair of ONNX Runtime sessions each). Measured
/// on ResNet-20, 2 CPU cores (`bench serve`): two single-threaded workers
/// serve 2.2× the frames/s of one worker with two intra-op threads, whose
/// small convolutions parallelize poorly. One worker per core, each with one
/// intra-op thread, is the default on CPU.
pub const DEFAULT_WORKERS: usize = 2;
/// Intra-op threads per session (see `DEFAULT_WORKERS`).
pub const DEFAULT_INTRA_THREADS: usize = 1;
/// Concurrent decodes: JPEG/PNG decoding of camera frames is cheap next to
/// the model, so a couple of threads keep up with the engine.
pub const DEFAULT_DECODE_THREADS: usize = 2;
/// Decision threshold used when none is configured. Uncalibrated: run
/// `calibrate` for a threshold at a chosen true-positive rate.
pub const DEFAULT_THRESHOLD: f32 = 0.5;
/// Per-frame override bounds: the paper's grid spans T ∈ [1, 1000] and
/// ε ∈ [0, 0.004].
pub const DEFAULT_OVERRIDE_BOUNDS: OverrideBounds = OverrideBounds {
    min_temperature: 1.0,
    max_temperature: 1000.0,
    max_epsilon: 0.004,
};
/// Largest gRPC message accepted (a frame), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A configuration the server cannot run with. `main` exits with 64
/// (sysexits' EX_USAGE) for it, so an orchestrator can tell a bad rollout
/// from a crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Everything `serve` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Which model to serve.
    pub model: ModelSource,
    /// Execution provider and threads of each session.
    pub engine: EngineOptions,
    /// Engine worker threads, one session each.
    pub workers: usize,
    /// Cross-stream batching.
    pub batch: BatchOptions,
    /// Scoring method.
    pub method: Method,
    /// Softmax temperature (1 = plain max-softmax).
    pub temperature: f32,
    /// ODIN perturbation size ε in [0, 1] pixel units.
    pub epsilon: f32,
    /// Decision threshold δ.
    pub threshold: f32,
    /// Where `threshold` came from, for `GetModelInfo` ("flag" or a file).
    pub threshold_source: String,
    /// Bounds on per-frame scoring overrides.
    pub bounds: OverrideBounds,
    /// Frames one stream may have in flight.
    pub stream_window: usize,
    /// Concurrent decodes (the bounded decode pool).
    pub decode_threads: usize,
    /// Unary calls in flight beyond which `DetectOne` answers
    /// RESOURCE_EXHAUSTED (0 = no limit: unary callers then wait in the queue).
    pub max_unary_in_flight: usize,
    /// Span export over OTLP/gRPC; `None` (the default) makes no spans.
    pub otlp: Option<OtlpConfig>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: ModelSource::Embedded,
            engine: EngineOptions {
                device: Device::Auto,
                intra_threads: DEFAULT_INTRA_THREADS,
            },
            workers: DEFAULT_WORKERS,
            batch: BatchOptions {
                max_batch: DEFAULT_MAX_BATCH,
                max_queue_delay: DEFAULT_MAX_QUEUE_DELAY,
                queue_capacity: DEFAULT_QUEUE_CAPACITY,
            },
            method: Method::Msp,
            temperature: 1.0,
            epsilon: 0.0,
            threshold: DEFAULT_THRESHOLD,
            threshold_source: "flag".into(),
            bounds: DEFAULT_OVERRIDE_BOUNDS,
            stream_window: order::DEFAULT_WINDOW,
            decode_threads: DEFAULT_DECODE_THREADS,
            max_unary_in_flight: 0,
            otlp: None,
        }
    }
}

impl ServeConfig {
    /// Checks the values a server cannot run with; the message names the
    /// setting and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.workers == 0 || self.batch.max_batch == 0 {
            return bad("workers and max batch must be at least 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return bad(format!("epsilon must be >= 0, got {}", self.epsilon));
        }
        Ok(())
    }

    /// The scoring of frames that carry no override.
    pub fn scoring(&self) -> crate::score::Scoring {
        crate::score::Scoring {
            method: self.method,
            temperature: self.temperature,
            epsilon: self.epsilon,
        }
    }
}
