//! `odin-sidecar bench`: benchmarks that print tables (speed targets are
//! checked here, never in timed tests). Every ratio is measured side by side
//! in one process, alternating the contenders, because the machines are
//! shared and noisy.
//!
//! - `bench engine`: one run of the plain model vs the gradient graph G vs
//!   whole ODIN (G, then the model on the perturbed batch), per batch size.
//! - `bench serve`: the sidecar as a separate process on loopback, driven by
//!   `loadgen`: end-to-end frames/s against the engine's in-process limit,
//!   open-loop p99 at half the saturating rate, and the server's peak RSS.
//! - `bench camera`: camera-size JPEG frames (32×32 to 1080p): the decode
//!   stage in-process on one thread (fast vs legacy path), and end-to-end
//!   ODIN frames/s over gRPC per size and per thread split.
//! - `bench tracing`: the cost of tracing every frame — end-to-end frames/s
//!   over gRPC with spans off vs on (always_on, exported over OTLP/gRPC to a
//!   receiver), two in-process servers driven in turn by `loadgen`.

mod camera;
mod engine;
mod serve;
mod tracing;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use camera::CameraBench;
pub use engine::EngineBench;
pub use serve::ServeBench;
pub use tracing::TracingBench;

/// Flags of `bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: Which,
}

/// The benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum Which {
    /// In-process engine: forward vs gradient graph vs ODIN, per batch size.
    Engine(EngineBench),
    /// End to end over gRPC on loopback, against the engine's limit.
    Serve(ServeBench),
    /// End-to-end frames/s with per-frame tracing off vs on.
    Tracing(TracingBench),
    /// Camera-size JPEG frames: decode stage in-process and end to end, per size and thread split.
    Camera(CameraBench),
}

/// Runs `bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        Which::Engine(bench) => tokio::task::spawn_blocking(move || engine::run(&bench)).await?,
        Which::Serve(bench) => serve::run(&bench).await,
        Which::Tracing(bench) => tracing::run(&bench).await,
        Which::Camera(bench) => camera::run(&bench).await,
    }
}

/// The median of a set of timings.
pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
