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
//! - `bench tracing`: the cost of tracing every frame — end-to-end frames/s
//!   over gRPC with spans off vs on (always_on, exported over OTLP/gRPC to a
//!   receiver), two in-process servers driven in turn by `loadgen`.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use clap::{Args, Subcommand};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;

use super::ModelArgs;
use crate::app::{self, App};
use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use crate::score::Perturbation;
use crate::telemetry::OtlpConfig;

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
}

/// Flags of `bench serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeBench {
    /// Seconds of each load run (after one second of warm-up).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Streams of the closed-loop run.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Frames in flight per stream in the closed-loop run.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Frames to send: a raw set NAME.u8.
    #[arg(long)]
    pub data: PathBuf,
    /// Extra flags for the server process (`serve`), e.g. "--workers 2".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub server_flags: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Flags of `bench tracing`.
#[derive(Debug, Clone, Args)]
pub struct TracingBench {
    /// Rounds; each runs tracing off and on once, in alternating order.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per run (warm-up included).
    #[arg(long, default_value_t = 6.0)]
    pub duration: f64,
    /// Seconds at the start of each run that are not measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Streams (closed loop).
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Frames in flight per stream.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Export to this OTLP/gRPC endpoint instead of an in-process receiver.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Frames from a raw set NAME.u8 or a folder of JPEG/PNG; synthetic 32x32 noise if omitted.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Flags of `bench engine`.
#[derive(Debug, Clone, Args)]
pub struct EngineBench {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 128])]
    pub batches: Vec<usize>,
    /// Rounds per batch size; each round times every contender once.
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.which {
        Which::Engine(bench) => tokio::task::spawn_blocking(move || engine(&bench)).await?,
        Which::Serve(bench) => serve(&bench).await,
        Which::Tracing(bench) => tracing_cost(&bench).await,
    }
}

/// An OTLP trace receiver that decodes and counts spans, like a collector's
/// receiver would before batching them on.
#[derive(Debug, Default, Clone)]
struct CountingReceiver(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for CountingReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// CPU time (user + system) this process has used, from /proc (Linux);
/// `None` elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux ABI Rust supports.
    Some(ticks / 100.0)
}

/// Serves `app` on a loopback port; returns the address.
async fn spawn_server(app: App) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        if let Err(e) = app.serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "bench server failed");
        }
    });
    Ok(addr)
}

async fn tracing_cost(args: &TracingBench) -> anyhow::Result<ExitCode> {
    let received = CountingReceiver::default();
    let endpoint = match &args.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let service = TraceServiceServer::new(received.clone());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
            );
            format!("http://{addr}")
        }
    };
    let off_config = args.model.config()?;
    let mut on_config = off_config.clone();
    on_config.otlp = Some(OtlpConfig {
        endpoint: Some(endpoint.clone()),
        always_on: true,
        ..OtlpConfig::default()
    });
    let off = App::build(&off_config).await?;
    let on = App::build(&on_config).await?;
    let info = off.info().clone();
    let on_telemetry = on.telemetry();
    let off_addr = spawn_server(off).await?;
    let on_addr = spawn_server(on).await?;
    let pool = Arc::new(super::loadgen::frames(args.data.as_ref())?);
    let load = |addr: &str| LoadConfig {
        target: Target::Tcp(addr.to_string()),
        mode: Mode::Stream,
        connections: 1,
        streams: args.streams,
        pacing: Pacing::Closed {
            in_flight: args.in_flight,
        },
        duration: Some(Duration::from_secs_f64(args.duration)),
        frames: None,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        pool: Arc::clone(&pool),
    };
    println!(
        "model {}, {}, method {}, {} streams x {} in flight, {} s runs, spans to {}\n",
        info.name,
        info.execution_provider,
        off_config.method,
        args.streams,
        args.in_flight,
        args.duration,
        if args.endpoint.is_some() {
            endpoint.as_str()
        } else {
            "an in-process OTLP receiver"
        }
    );
    println!("| round | off frames/s | on frames/s | on / off | off p50 ms | on p50 ms | off CPU µs/frame | on CPU µs/frame | CPU on / off |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let (mut offs, mut ons) = (Vec::new(), Vec::new());
    let (mut cpu_offs, mut cpu_ons) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which goes first, so drift in the machine's load
        // does not favour one side.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        let mut reports = [None, None];
        let mut cpu = [0.0; 2];
        for traced in order {
            let addr = if traced { &on_addr } else { &off_addr };
            let before = process_cpu_seconds();
            let report = loadgen::run(load(addr), false).await?;
            // CPU per frame of the whole process (servers, client, receiver):
            // unlike frames/s it barely moves with other tenants' load.
            if let (Some(before), Some(after)) = (before, process_cpu_seconds()) {
                cpu[usize::from(traced)] =
                    (after - before) * 1e6 / report.stats.answered.max(1) as f64;
            }
            reports[usize::from(traced)] = Some(report);
        }
        let [Some(off), Some(on)] = reports else {
            anyhow::bail!("a run produced no report");
        };
        let (f_off, f_on) = (off.frames_per_second(), on.frames_per_second());
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.2} | {:.2} | {:.0} | {:.0} | {:.3} |",
            round + 1,
            f_off,
            f_on,
            f_on / f_off,
            off.latency_ms(0.5),
            on.latency_ms(0.5),
            cpu[0],
            cpu[1],
            cpu[1] / cpu[0]
        );
        offs.push(f_off);
        ons.push(f_on);
        cpu_offs.push(cpu[0]);
        cpu_ons.push(cpu[1]);
    }
    let median_f = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ratios: Vec<f64> = ons.iter().zip(&offs).map(|(on, off)| on / off).collect();
    let cpu_ratios: Vec<f64> = cpu_ons
        .iter()
        .zip(&cpu_offs)
        .map(|(on, off)| on / off)
        .collect();
    let (m_off, m_on, m_ratio) = (median_f(offs), median_f(ons), median_f(ratios));
    let (c_off, c_on, c_ratio) = (median_f(cpu_offs), median_f(cpu_ons), median_f(cpu_ratios));
    println!("| median | {m_off:.0} | {m_on:.0} | {m_ratio:.3} | | | {c_off:.0} | {c_on:.0} | {c_ratio:.3} |");
    println!(
        "\ntracing on: frames/s {:+.1}%, CPU per frame {:+.1}% (medians of per-round ratios; goal: ≤ 5% fewer frames/s)",
        (m_ratio - 1.0) * 100.0,
        (c_ratio - 1.0) * 100.0
    );
    let telemetry = Arc::clone(&on_telemetry);
    tokio::task::spawn_blocking(move || telemetry.flush()).await?;
    let metrics = on_telemetry.metrics();
    println!(
        "spans exported {}, dropped {}{}",
        metrics.spans_exported.load(Ordering::Relaxed),
        metrics.spans_dropped.load(Ordering::Relaxed),
        if args.endpoint.is_none() {
            format!(", received {}", received.0.load(Ordering::Relaxed))
        } else {
            String::new()
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn engine(args: &EngineBench) -> anyhow::Result<ExitCode> {
    let config = args.model.config()?;
    let (model, mut engine, pre) = app::offline_engine(&config)?;
    anyhow::ensure!(
        engine.can_perturb(),
        "the gradient graph could not be derived for this model"
    );
    let odin = Perturbation {
        temperature: 1000.0,
        epsilon: model.card.odin.epsilon,
    };
    println!(
        "model {}, {}, intra-op threads {}, median of {} rounds\n",
        model.card.name,
        engine.provider(),
        if config.engine.intra_threads == 0 {
            "auto".to_string()
        } else {
            config.engine.intra_threads.to_string()
        },
        args.rounds
    );
    println!("| batch | forward ms | G ms | G / forward | ODIN ms | forward frames/s | ODIN frames/s | ODIN / forward |");
    println!("|---|---|---|---|---|---|---|---|");
    for &batch in &args.batches {
        // Real-looking input: a deterministic ramp, normalized like the model's.
        let input: Vec<f32> = (0..batch * pre.tensor_len())
            .map(|i| ((i % 255) as f32 / 255.0 - 0.5) / 0.25)
            .collect();
        let (mut forward, mut gradient, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds + 2 {
            let t = Instant::now();
            engine.logits(&input, batch)?;
            let f = t.elapsed();
            let t = Instant::now();
            engine.perturb(&input, batch, odin)?;
            let g = t.elapsed();
            let t = Instant::now();
            engine.run(&input, batch, Some(odin))?;
            let o = t.elapsed();
            // The first two rounds warm caches and allocators.
            if round >= 2 {
                forward.push(f);
                gradient.push(g);
                whole.push(o);
            }
        }
        let (f, g, o) = (median(forward), median(gradient), median(whole));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let fps = |d: Duration| batch as f64 / d.as_secs_f64();
        println!(
            "| {batch} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.3} |",
            ms(f),
            ms(g),
            ms(g) / ms(f),
            ms(o),
            fps(f),
            fps(o),
            fps(o) / fps(f)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// ODIN frames/s of `config.workers` engines (the server's own sessions and
/// threads) running batches of `batch` back to back in parallel: the limit
/// a server with that configuration cannot beat.
async fn parallel_engines(
    config: &crate::config::ServeConfig,
    batch: usize,
) -> anyhow::Result<f64> {
    const RUNS: usize = 8;
    let perturbation = config.scoring().perturbation();
    let mut engines = Vec::new();
    for _ in 0..config.workers.max(1) {
        let config = config.clone();
        engines.push(tokio::task::spawn_blocking(move || app::offline_engine(&config)).await??);
    }
    let barrier = Arc::new(std::sync::Barrier::new(engines.len()));
    let mut threads = Vec::new();
    for (_, mut engine, pre) in engines {
        let barrier = Arc::clone(&barrier);
        threads.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<Duration> {
                let input = vec![0.1f32; batch * pre.tensor_len()];
                engine.run(&input, batch, perturbation)?; // warm-up
                barrier.wait();
                let t = Instant::now();
                for _ in 0..RUNS {
                    engine.run(&input, batch, perturbation)?;
                }
                Ok(t.elapsed())
            },
        ));
    }
    let mut slowest = Duration::ZERO;
    for t in threads {
        slowest = slowest.max(t.await??);
    }
    Ok((config.workers.max(1) * RUNS * batch) as f64 / slowest.as_secs_f64())
}

/// The model flags of `args` as command-line words, for the server process.
fn model_flags(args: &ModelArgs) -> Vec<String> {
    let mut flags = vec![
        "--device".to_string(),
        format!("{:?}", args.device).to_lowercase(),
    ];
    if let Some(m) = &args.model {
        flags.extend(["--model".into(), m.display().to_string()]);
    }
    if let Some(c) = &args.card {
        flags.extend(["--card".into(), c.display().to_string()]);
    }
    flags.extend([
        "--method".into(),
        args.method.to_string(),
        "--temperature".into(),
        args.temperature.to_string(),
        "--epsilon".into(),
        args.epsilon.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--workers".into(),
        args.workers.to_string(),
        "--max-batch".into(),
        args.max_batch.to_string(),
        "--max-queue-delay-ms".into(),
        args.max_queue_delay_ms.to_string(),
    ]);
    flags
}

/// Peak resident set size (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

async fn serve(args: &ServeBench) -> anyhow::Result<ExitCode> {
    use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};

    // 1. The engine's limit, in-process: best ODIN frames/s over batch sizes.
    let limit = {
        let config = args.model.config()?;
        let mut best = (0, 0.0);
        for batch in [1usize, 8, 32, 128] {
            let fps = parallel_engines(&config, batch).await?;
            println!(
                "engine in-process, {} worker(s), batch {batch:>3}: {fps:>7.0} frames/s",
                config.workers
            );
            if fps > best.1 {
                best = (batch, fps);
            }
        }
        best
    };

    // 2. The server as its own process, so its RSS is its own.
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .arg("serve")
        .args(["--addr", "127.0.0.1:0"])
        .args(model_flags(&args.model))
        .args(args.server_flags.split_whitespace())
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
    let addr = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("server exited before serving"))?;
        if let Some(rest) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("serving"))
        {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let set = crate::dataset::RawSet::open(&args.data)?;
    let pool: Arc<Vec<crate::wire::Frame>> = Arc::new(
        (0..set.n.min(2048))
            .map(|i| crate::wire::Frame {
                image: Some(crate::wire::frame::Image::Raw(set.raw(i))),
                ..Default::default()
            })
            .collect(),
    );
    let load = |pacing| LoadConfig {
        target: Target::Tcp(addr.clone()),
        mode: Mode::Stream,
        connections: 1,
        streams: args.streams,
        pacing,
        duration: Some(Duration::from_secs_f64(args.seconds + 1.0)),
        frames: None,
        warmup: Duration::from_secs(1),
        pool: Arc::clone(&pool),
    };
    let closed = loadgen::run(
        load(Pacing::Closed {
            in_flight: args.in_flight,
        }),
        false,
    )
    .await?;
    let saturating = closed.frames_per_second();
    let open = loadgen::run(
        load(Pacing::Open {
            rate: saturating / 2.0,
        }),
        false,
    )
    .await?;
    let rss = peak_rss_mib(pid);
    let _ = child.start_kill();

    let compute_ms = open.stats.compute.value_at_quantile(0.5) as f64 / 1000.0;
    let p99 = open.latency_ms(0.99);
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| engine limit (in-process ODIN, best batch {}) | {:.0} frames/s |",
        limit.0, limit.1
    );
    println!(
        "| gRPC closed loop, {} streams × {} in flight | {saturating:.0} frames/s |",
        args.streams, args.in_flight
    );
    println!(
        "| ratio end-to-end / engine limit | {:.2} |",
        saturating / limit.1
    );
    println!(
        "| open loop at 50% ({:.0} frames/s): p99 latency | {p99:.2} ms |",
        saturating / 2.0
    );
    println!("| median compute time of one batch at that load | {compute_ms:.2} ms |");
    println!(
        "| ratio p99 / batch compute | {:.2} |",
        p99 / compute_ms.max(1e-3)
    );
    println!(
        "| server peak RSS (VmHWM) | {} |",
        rss.map_or("unavailable".to_string(), |r| format!("{r:.0} MiB"))
    );
    println!(
        "| errors (closed, open) | {}, {} |",
        closed.stats.error_count(),
        open.stats.error_count()
    );
    Ok(ExitCode::SUCCESS)
}
