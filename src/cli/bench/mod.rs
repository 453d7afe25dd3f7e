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
//! - `bench overload`: several times the saturating load for a minute: the
//!   server's resident memory against its budget, every frame answered or
//!   refused with a status, the p99 of the answered; then the drain time.
//! - `bench soak`: half the saturating load for minutes: RSS minute by minute.
//! - `bench fairness`: one client's p99 while another sends expensive frames.

mod camera;
mod engine;
mod fairness;
mod overload;
mod serve;
mod tracing;

use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};

pub use camera::CameraBench;
pub use engine::EngineBench;
pub use fairness::FairnessBench;
pub use overload::{OverloadBench, SoakBench};
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
    /// Memory, losses and p99 at several times the saturating load; drain time.
    Overload(OverloadBench),
    /// Resident memory over minutes at half the saturating load.
    Soak(SoakBench),
    /// One client's latency while another sends expensive frames.
    Fairness(FairnessBench),
    /// Camera-size JPEG frames: decode stage in-process and end to end, per size and thread split.
    Camera(CameraBench),
}

/// Runs `bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        Which::Engine(bench) => tokio::task::spawn_blocking(move || engine::run(&bench)).await?,
        Which::Serve(bench) => serve::run(&bench).await,
        Which::Tracing(bench) => tracing::run(&bench).await,
        Which::Overload(bench) => overload::run(&bench).await,
        Which::Soak(bench) => overload::soak(&bench).await,
        Which::Fairness(bench) => fairness::run(&bench).await,
        Which::Camera(bench) => camera::run(&bench).await,
    }
}

/// A `serve` process of this binary on a loopback port: the server under
/// test, so that its memory is its own. Killed when dropped.
pub(crate) struct ServerProcess {
    child: tokio::process::Child,
    /// Its process id.
    pub pid: u32,
    /// The `host:port` it serves gRPC on.
    pub addr: String,
    /// The `host:port` of its HTTP endpoints (`/metrics`).
    pub http: Option<String>,
}

impl ServerProcess {
    /// Starts `odin-sidecar serve --addr 127.0.0.1:0 --metrics-addr
    /// 127.0.0.1:0 FLAGS…` and waits until it serves.
    pub async fn start(flags: &[String]) -> anyhow::Result<ServerProcess> {
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(exe)
            .arg("serve")
            .args(["--addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
            .args(flags)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("server exited at once"))?;
        let mut lines = BufReader::new(
            child
                .stderr
                .take()
                .ok_or_else(|| anyhow::anyhow!("no stderr"))?,
        )
        .lines();
        let after = |line: &str| {
            line.split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        };
        let mut http = None;
        let addr = loop {
            let line = lines
                .next_line()
                .await?
                .ok_or_else(|| anyhow::anyhow!("server exited before serving"))?;
            if line.contains("/metrics") {
                http = after(&line);
            } else if line.contains("serving odin.v1.Detector") {
                break after(&line).unwrap_or_default();
            }
        };
        // Keep reading, or a full pipe would block the server's logging.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServerProcess {
            child,
            pid,
            addr,
            http,
        })
    }

    /// Resident set size now (VmRSS), in MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        status_kib(self.pid, "VmRSS:").map(|k| k / 1024.0)
    }

    /// Peak resident set size (VmHWM), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        status_kib(self.pid, "VmHWM:").map(|k| k / 1024.0)
    }

    /// One value of its `/metrics`, e.g. `odin_frames_held_bytes`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.http.as_deref()?)
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Sends SIGTERM and waits for the exit: its status and how long it took.
    pub async fn terminate(mut self) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let started = std::time::Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?;
        let status = self.child.wait().await?;
        Ok((status, started.elapsed()))
    }
}

fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The median of a set of timings.
pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
