//! Resolved configuration of a serving sidecar, with its defaults.
//!
//! The CLI (`cli::serve`) parses flags into a `ServeConfig`; tests build one
//! directly, so nothing here reads the process environment.

use std::time::Duration;

use crate::engine::{Device, EngineOptions};
use crate::model::ModelSource;
use crate::pipeline::decode::DecodeOptions;
use crate::pipeline::{order, BatchOptions, OverrideBounds};
use crate::score::Method;
use crate::telemetry::OtlpConfig;

/// Address `serve` listens on by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";
/// Largest batch handed to one engine run.
pub const DEFAULT_MAX_BATCH: usize = 32;
/// Longest a frame waits for others to share its batch.
pub const DEFAULT_MAX_QUEUE_DELAY: Duration = Duration::ZERO;
/// Frames one client may have waiting for an engine worker before its
/// submitters are held back.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// Engine worker threads (one pair of ONNX Runtime sessions each). Measured
/// on ResNet-20, 2 CPU cores (`bench serve`): two single-threaded workers
/// serve 2.2× the frames/s of one worker with two intra-op threads, whose
/// small convolutions parallelize poorly. One worker per core, each with one
/// intra-op thread, is the default on CPU.
pub const DEFAULT_WORKERS: usize = 2;
/// Intra-op threads per session (see `DEFAULT_WORKERS`).
pub const DEFAULT_INTRA_THREADS: usize = 1;
/// Concurrent decodes (`--decode-threads`, `ODIN_DECODE_THREADS`). Decoders
/// and engine workers share the cores; measured with `bench camera --split`
/// on 2 CPU cores (README, "Thread split"), one decoder per core is best or
/// within noise of the best at every frame size: a 1080p JPEG takes about
/// 2.9 ms to decode, twice the built-in model's ODIN work per frame, and one
/// decoder capped 1080p at 255 frames/s against 317 with two; three or four
/// only time-slice the same cores (287 and 329, within the run's noise, and
/// slower at 640×480). With [`DEFAULT_WORKERS`] engine workers that is
/// one decoder and one single-threaded worker per core. On a machine with
/// more cores, give it one per core.
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
/// Bytes of frames the server holds at once, over every stream and call:
/// a 512 MiB container keeps half for the model, the runtime and the
/// decoders (see README, "Limits and failure behaviour").
pub const DEFAULT_MEMORY_BUDGET: usize = 256 * 1024 * 1024;

/// Default bytes of request messages on their way in (see
/// `server::receive`): with the frame budget, under 512 MiB in all.
pub const DEFAULT_RECEIVE_BUDGET: usize = 64 * 1024 * 1024;
/// Largest image a decoder may produce, in pixels, checked from the header
/// before anything is allocated: 4096² covers 4K UHD (3840×2160) and keeps
/// one RGBA decode under 64 MiB.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;
/// Open connections beyond which new ones are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// HTTP/2 streams (calls) one connection may have open at once.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
/// How often the server pings an HTTP/2 connection to find dead peers.
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no call open for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A new connection must finish its TLS handshake and start its first call
/// within this time.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one connection may make the server reset (for protocol errors)
/// before it is sent GOAWAY: the RUSTSEC-2024-0003 / "rapid reset" guard.
pub const DEFAULT_MAX_LOCAL_RESETS: usize = 1024;
/// How long a shutdown waits for accepted frames to be answered.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// File mode of the Unix socket: owner and group may connect.
pub const DEFAULT_UDS_MODE: u32 = 0o660;

/// Caps on what one frame may carry besides its image, so a verdict (which
/// echoes them) and a span stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldLimits {
    /// Longest `frame_id`, in bytes.
    pub max_id_bytes: usize,
    /// Most attributes.
    pub max_attributes: usize,
    /// Longest attribute key plus value, in bytes.
    pub max_attribute_bytes: usize,
    /// Longest method name in a scoring override, in bytes.
    pub max_method_bytes: usize,
}

/// Default [`FieldLimits`].
pub const DEFAULT_FIELD_LIMITS: FieldLimits = FieldLimits {
    max_id_bytes: 256,
    max_attributes: 32,
    max_attribute_bytes: 1024,
    max_method_bytes: 32,
};

/// What the network edge enforces: connections, HTTP/2, deadlines, shutdown
/// and access.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkOptions {
    /// Open connections beyond which new ones are closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection (advertised as MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout.
    pub keepalive_timeout: Duration,
    /// A connection with no open call is closed after this long.
    pub idle_timeout: Duration,
    /// Time a new connection gets for its TLS handshake and first call.
    pub handshake_timeout: Duration,
    /// Connections are asked to go away (GOAWAY) after this age, so load
    /// balancers can rebalance; `None` keeps them.
    pub max_connection_age: Option<Duration>,
    /// After `max_connection_age`, calls still open get this long to finish.
    pub max_connection_age_grace: Duration,
    /// Server-generated stream resets tolerated per connection.
    pub max_local_resets: usize,
    /// Bytes of request messages being received at once, over all calls.
    pub receive_budget: usize,
    /// Longest a unary call may take; a client's shorter `grpc-timeout` wins.
    pub request_timeout: Option<Duration>,
    /// How long a shutdown waits for accepted frames.
    pub shutdown_grace: Duration,
    /// Unix socket file mode.
    pub uds_mode: u32,
    /// TLS on TCP listeners; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// A file holding the bearer token every call but health must present.
    pub auth_token_file: Option<std::path::PathBuf>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            receive_budget: DEFAULT_RECEIVE_BUDGET,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(30),
            max_local_resets: DEFAULT_MAX_LOCAL_RESETS,
            request_timeout: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            uds_mode: DEFAULT_UDS_MODE,
            tls: None,
            auth_token_file: None,
        }
    }
}

/// PEM files for TLS, reloaded when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: std::path::PathBuf,
    /// The server's private key.
    pub key: std::path::PathBuf,
    /// CA bundle that client certificates must chain to; `Some` turns on
    /// mutual TLS (clients without a valid certificate are refused).
    pub client_ca: Option<std::path::PathBuf>,
}

/// Where the scoring settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalibrationSource {
    /// `--method`, `--temperature`, `--epsilon`, `--threshold` (or defaults).
    Flags,
    /// The built-in model's calibration, compiled in.
    BuiltIn,
    /// A calibration file from `calibrate`.
    File(std::path::PathBuf),
}

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
    /// Where method, T, ε and threshold came from; a calibration file is
    /// read again on a live reload.
    pub calibration: CalibrationSource,
    /// Fit statistics files given with `--fit-stats`, for the
    /// feature-space detectors (besides those the calibration names).
    pub fit_stats: Vec<std::path::PathBuf>,
    /// The fit statistics the calibration names, resolved against its
    /// folder, with the SHA-256 each must have.
    pub calibrated_stats: Vec<(std::path::PathBuf, String)>,
    /// The calibrated combination, when the method is `combined` (its
    /// parts' statistics index `calibrated_stats`).
    pub combination: Option<crate::score::Combination>,
    /// Bounds on per-frame scoring overrides.
    pub bounds: OverrideBounds,
    /// Frames one stream may have in flight.
    pub stream_window: usize,
    /// Concurrent decodes (the bounded decode pool).
    pub decode_threads: usize,
    /// Decode path and resize filter overrides (defaults: the fast path,
    /// the card's filter).
    pub decode: DecodeOptions,
    /// Unary calls in flight beyond which `DetectOne` and `ModelInfer` answer
    /// RESOURCE_EXHAUSTED (0 = no limit: unary callers then wait in the queue).
    pub max_unary_in_flight: usize,
    /// Span export over OTLP/gRPC; `None` (the default) makes no spans.
    pub otlp: Option<OtlpConfig>,
    /// Bytes of frames the server holds at once (all streams and calls).
    pub memory_budget: usize,
    /// Largest decoded image, in pixels.
    pub max_pixels: u64,
    /// Caps on a frame's id, attributes and method name.
    pub fields: FieldLimits,
    /// Accepted range of tensor-frame values; `None` derives it from the
    /// card: what its normalization makes of pixels in [0, 255], widened by
    /// one std on each side.
    pub tensor_range: Option<(f32, f32)>,
    /// Connections, HTTP/2, deadlines, shutdown, TLS and auth.
    pub network: NetworkOptions,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: ModelSource::Embedded,
            engine: EngineOptions {
                device: Device::Auto,
                intra_threads: DEFAULT_INTRA_THREADS,
                fused: true,
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
            calibration: CalibrationSource::Flags,
            fit_stats: Vec::new(),
            calibrated_stats: Vec::new(),
            combination: None,
            bounds: DEFAULT_OVERRIDE_BOUNDS,
            stream_window: order::DEFAULT_WINDOW,
            decode_threads: DEFAULT_DECODE_THREADS,
            decode: DecodeOptions::default(),
            max_unary_in_flight: 0,
            otlp: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_pixels: DEFAULT_MAX_PIXELS,
            fields: DEFAULT_FIELD_LIMITS,
            tensor_range: None,
            network: NetworkOptions::default(),
        }
    }
}

impl ServeConfig {
    /// Checks the values a server cannot run with; the message names the
    /// setting and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.workers == 0 || self.batch.max_batch == 0 || self.decode_threads == 0 {
            return bad("workers, max batch and decode threads must be at least 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return bad(format!("epsilon must be >= 0, got {}", self.epsilon));
        }
        if self.memory_budget < MAX_MESSAGE_BYTES {
            return bad(format!(
                "the memory budget ({} MiB) must hold at least one frame of the largest size ({} MiB)",
                self.memory_budget >> 20,
                MAX_MESSAGE_BYTES >> 20
            ));
        }
        if self.network.receive_budget < MAX_MESSAGE_BYTES {
            return bad(format!(
                "the receive budget ({} MiB) must hold at least one message of the largest size ({} MiB)",
                self.network.receive_budget >> 20,
                MAX_MESSAGE_BYTES >> 20
            ));
        }
        if self.max_pixels == 0 || self.network.max_connections == 0 {
            return bad("max pixels and max connections must be at least 1".into());
        }
        if let Some((lo, hi)) = self.tensor_range {
            if !(lo.is_finite() && hi.is_finite() && lo < hi) {
                return bad(format!("tensor range [{lo}, {hi}] is empty or not finite"));
            }
        }
        Ok(())
    }

    /// Reads the calibration (file or built-in) and sets method, T, ε,
    /// threshold and where they came from; returns the calibration's
    /// version ("flags" when none). Called at start and on every reload.
    pub fn apply_calibration(&mut self) -> Result<String, ConfigError> {
        use crate::calib::calibrate::Calibration;
        let (calibration, source, version) = match &self.calibration {
            CalibrationSource::Flags => {
                self.calibrated_stats.clear();
                self.combination = None;
                return Ok("flags".into());
            }
            CalibrationSource::BuiltIn => {
                let text = crate::model::DEFAULT_MODEL_CALIBRATION;
                let calibration = Calibration::parse(text, "<embedded>")
                    .map_err(|e| ConfigError(format!("built-in calibration: {e}")))?;
                let version = crate::model::short_digest(text.as_bytes());
                let source = "built-in calibration (models/cifar10_cnn.calibration.json)";
                (calibration, source.to_string(), version)
            }
            CalibrationSource::File(path) => {
                let bad = |e: &dyn std::fmt::Display| {
                    ConfigError(format!("--calibration {}: {e}", path.display()))
                };
                let bytes = std::fs::read(path).map_err(|e| bad(&e))?;
                let text = std::str::from_utf8(&bytes).map_err(|e| bad(&e))?;
                let name = path
                    .file_name()
                    .map_or_else(|| "calibration".into(), |n| n.to_string_lossy());
                let calibration = Calibration::parse(text, &name).map_err(|e| bad(&e))?;
                let version = crate::model::short_digest(&bytes);
                // Its name and digest, never the server's path to it.
                let source = format!("{name} (sha256 {version}…)");
                (calibration, source, version)
            }
        };
        let folder = match &self.calibration {
            CalibrationSource::File(path) => path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default(),
            _ => std::path::PathBuf::new(),
        };
        self.calibrated_stats = calibration
            .fit_stats
            .iter()
            .map(|r| (folder.join(&r.file), r.sha256.clone()))
            .collect();
        self.combination = calibration.combination();
        self.method = calibration.method();
        self.temperature = calibration.temperature;
        self.epsilon = calibration.epsilon;
        self.threshold = calibration.threshold;
        self.threshold_source = source;
        Ok(version)
    }

    /// What a frame may make the decoder do.
    pub fn decode_limits(&self) -> crate::pipeline::DecodeLimits {
        crate::pipeline::DecodeLimits {
            max_pixels: self.max_pixels,
            tensor_range: self.tensor_range,
        }
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
