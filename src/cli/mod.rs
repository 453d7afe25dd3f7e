//! The command line: one file per subcommand, each with its own flags.
//! Flags are parsed here and resolved into `config::ServeConfig`.

pub mod bench;
pub mod calibrate;
mod calibrate_auto;
pub mod detect;
pub mod eval;
pub mod export_grad;
pub mod fit;
pub mod info;
pub mod loadgen;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, CalibrationSource, ServeConfig};
use crate::engine::{Device, EngineOptions};
use crate::model::ModelSource;
use crate::model::Resize;
use crate::pipeline::decode::{DecodeOptions, DecodePath};
use crate::pipeline::BatchOptions;
use crate::score::Method;

/// Out-of-distribution detection sidecar (ODIN) for ONNX image classifiers.
#[derive(Debug, Parser)]
#[command(name = "odin-sidecar", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "ODIN_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Detector gRPC service.
    Serve(Box<serve::ServeArgs>),
    /// Judge image files in-process and print one verdict per frame.
    Detect(detect::DetectArgs),
    /// Print what would be served: model, input, provider, scoring.
    Info(info::InfoArgs),
    /// Fit the feature-space detectors' training statistics (KNN bank, class
    /// means and covariance, ViM subspace, ReAct percentiles) to a safetensors file.
    Fit(Box<fit::FitArgs>),
    /// Fit ODIN's temperature, perturbation and threshold on validation images.
    Calibrate(calibrate::CalibrateArgs),
    /// Measure OOD detection (FPR at 95% TPR, AUROC, ...) on ID and OOD sets.
    Eval(eval::EvalArgs),
    /// Load-test a running sidecar and report per-frame latency.
    Loadgen(loadgen::LoadgenArgs),
    /// Print benchmark tables (engine speed, serving throughput).
    Bench(bench::BenchArgs),
    /// Derive the ODIN perturbation graph (standard ONNX ops) of a classifier.
    ExportGrad(export_grad::ExportGradArgs),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve::run(*args)),
        Command::Detect(args) => runtime.block_on(detect::run(args)),
        Command::Info(args) => runtime.block_on(info::run(args)),
        Command::Fit(args) => runtime.block_on(fit::run(*args)),
        Command::Calibrate(args) => runtime.block_on(calibrate::run(args)),
        Command::Eval(args) => runtime.block_on(eval::run(args)),
        Command::Loadgen(args) => runtime.block_on(loadgen::run(args)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::ExportGrad(args) => runtime.block_on(export_grad::run(args)),
    }
}

/// Whether `error` comes from an unusable configuration (exit code 64).
pub fn is_usage_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<config::ConfigError>()
            || matches!(
                cause.downcast_ref::<crate::app::StartError>(),
                Some(crate::app::StartError::Config(_))
            )
    })
}

/// Sets up `tracing` output on stderr; `RUST_LOG` filters (default `info`).
/// With tracing on, lines about a frame sit in an `otel` span carrying its
/// `trace_id` and `span_id` (see `crate::telemetry::log_span`).
pub fn init_logging(format: LogFormat) {
    // ONNX Runtime logs every graph transformer at info: keep it at warn
    // unless RUST_LOG asks for `ort` explicitly.
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let directives = if directives.contains("ort") {
        directives
    } else {
        format!("{directives},ort=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Flags that choose and run the model; shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// ONNX classifier to serve; the built-in CIFAR-10 CNN if omitted.
    #[arg(long, env = "ODIN_MODEL")]
    pub model: Option<PathBuf>,
    /// Model card (JSON); defaults to MODEL with extension .card.json.
    #[arg(long, env = "ODIN_CARD", requires = "model")]
    pub card: Option<PathBuf>,
    /// Execution provider: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "ODIN_DEVICE")]
    pub device: Device,
    /// Intra-op threads per session (0 = ONNX Runtime's choice).
    #[arg(long, default_value_t = config::DEFAULT_INTRA_THREADS, env = "ODIN_THREADS")]
    pub threads: usize,
    /// How ODIN runs: `fused` (one graph: the gradient pass and the forward
    /// pass on the perturbed input, one session run) or `two-session` (the
    /// gradient graph, then the model on its output). Equal results; equal
    /// speed on CPU (README, "Engine cost of ODIN").
    #[arg(long, value_enum, default_value_t = EngineKind::Fused, env = "ODIN_ENGINE")]
    pub engine: EngineKind,
    /// Engine worker threads, one ONNX Runtime session each.
    #[arg(long, default_value_t = config::DEFAULT_WORKERS, env = "ODIN_WORKERS")]
    pub workers: usize,
    /// Most frames per engine run.
    #[arg(long, default_value_t = config::DEFAULT_MAX_BATCH, env = "ODIN_MAX_BATCH")]
    pub max_batch: usize,
    /// Concurrent JPEG/PNG decodes (the bounded decode pool).
    #[arg(long, default_value_t = config::DEFAULT_DECODE_THREADS, env = "ODIN_DECODE_THREADS")]
    pub decode_threads: usize,
    /// Decoder: `fast` (the default) or `legacy`, the old full-resolution
    /// path of the `image` crate, kept only for fidelity comparisons.
    #[arg(long, default_value = "fast", env = "ODIN_DECODE", hide = true)]
    pub decode: DecodePath,
    /// Resize filter replacing the card's (`bilinear`, `area`, `none`), for
    /// fidelity comparisons without editing the card.
    #[arg(long, env = "ODIN_RESIZE", hide = true)]
    pub resize: Option<Resize>,
    /// Unary calls (DetectOne, ModelInfer) in flight beyond which new ones get RESOURCE_EXHAUSTED (0 = no limit).
    #[arg(long, default_value_t = 0, env = "ODIN_MAX_UNARY_IN_FLIGHT")]
    pub max_unary_in_flight: usize,
    /// Longest a frame waits for a batch to fill, in milliseconds.
    #[arg(long, default_value_t = 0.0, env = "ODIN_MAX_QUEUE_DELAY_MS")]
    pub max_queue_delay_ms: f64,
    /// Scoring method: msp, odin, energy, maxlogit, gen, knn, vim, mds, rmds,
    /// react, fdbd (hyper-parameters as in `knn(k=10)`, `vim(dim=32)`,
    /// `react(p=95)`, `gen(gamma=0.1,M=10)`) [default: msp; for the built-in
    /// model with none of these four flags: its calibration, odin]. The
    /// feature-space detectors need --fit-stats; every method but msp and
    /// maxlogit reads the perturbed frame when ε > 0.
    #[arg(long, env = "ODIN_METHOD")]
    pub method: Option<Method>,
    /// Softmax temperature T [default: 1].
    #[arg(long, env = "ODIN_TEMPERATURE")]
    pub temperature: Option<f32>,
    /// Decision threshold δ: in-distribution iff score ≥ δ [default: 0.5, uncalibrated].
    #[arg(long, env = "ODIN_THRESHOLD")]
    pub threshold: Option<f32>,
    /// ODIN perturbation size ε in [0, 1] pixel units (odin and energy) [default: 0].
    #[arg(long, env = "ODIN_EPSILON")]
    pub epsilon: Option<f32>,
    /// A calibration file from `calibrate`: sets method, T, ε and threshold
    /// (and the detector's fit statistics and combination).
    #[arg(
        long,
        env = "ODIN_CALIBRATION",
        conflicts_with_all = ["method", "temperature", "epsilon", "threshold"]
    )]
    pub calibration: Option<PathBuf>,
    /// Fit statistics from `fit` (repeatable, or comma-separated in the
    /// environment) for the feature-space detectors, besides those the
    /// calibration names. A detector on perturbed frames uses the file
    /// fitted on training features perturbed the same way, else the clean one.
    #[arg(long, env = "ODIN_FIT_STATS", value_delimiter = ',')]
    pub fit_stats: Vec<PathBuf>,
}

/// `--engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// One fused graph.
    Fused,
    /// The gradient graph, then the model.
    TwoSession,
}

impl ModelArgs {
    /// Resolves the flags into a serving configuration.
    pub fn config(&self) -> anyhow::Result<ServeConfig> {
        if !(self.max_queue_delay_ms.is_finite() && self.max_queue_delay_ms >= 0.0) {
            return Err(config::ConfigError(
                "--max-queue-delay-ms must be a non-negative number".into(),
            )
            .into());
        }
        let model = match &self.model {
            None => ModelSource::Embedded,
            Some(model) => ModelSource::File {
                model: model.clone(),
                card: self.card.clone(),
            },
        };
        let defaults = ServeConfig::default();
        let mut config = ServeConfig {
            model,
            engine: EngineOptions {
                device: self.device,
                intra_threads: self.threads,
                fused: self.engine == EngineKind::Fused,
            },
            workers: self.workers,
            batch: BatchOptions {
                max_batch: self.max_batch,
                max_queue_delay: Duration::from_secs_f64(self.max_queue_delay_ms / 1000.0),
                ..defaults.batch
            },
            method: self.method.unwrap_or(defaults.method),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            epsilon: self.epsilon.unwrap_or(defaults.epsilon),
            threshold: self.threshold.unwrap_or(defaults.threshold),
            decode_threads: self.decode_threads,
            decode: DecodeOptions {
                path: self.decode,
                resize: self.resize,
                jpeg: None,
            },
            max_unary_in_flight: self.max_unary_in_flight,
            fit_stats: self.fit_stats.clone(),
            ..defaults
        };
        let scoring_flags = self.method.is_some()
            || self.temperature.is_some()
            || self.epsilon.is_some()
            || self.threshold.is_some();
        config.calibration = match (&self.calibration, &self.model) {
            (Some(path), _) => CalibrationSource::File(path.clone()),
            // The built-in model ships calibrated, so `serve` alone gives ODIN verdicts.
            (None, None) if !scoring_flags => CalibrationSource::BuiltIn,
            _ => CalibrationSource::Flags,
        };
        config.apply_calibration()?;
        Ok(config)
    }
}
