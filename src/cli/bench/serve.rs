//! `bench serve`: the sidecar as a separate process on loopback, driven by
//! `loadgen`: end-to-end frames/s against the engine's in-process limit,
//! open-loop p99 at half the saturating rate, and the server's peak RSS.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::ServerProcess;
use crate::app;
use crate::cli::ModelArgs;
use crate::wire::odin_v1;

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
pub(super) fn model_flags(args: &ModelArgs) -> Vec<String> {
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
    let scoring = [
        ("--method", args.method.map(|m| m.to_string())),
        ("--temperature", args.temperature.map(|t| t.to_string())),
        ("--epsilon", args.epsilon.map(|e| e.to_string())),
        ("--threshold", args.threshold.map(|t| t.to_string())),
    ];
    for (flag, value) in scoring {
        if let Some(value) = value {
            flags.extend([flag.to_string(), value]);
        }
    }
    if let Some(c) = &args.calibration {
        flags.extend(["--calibration".into(), c.display().to_string()]);
    }
    flags.extend([
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

/// Runs `bench serve`.
pub async fn run(args: &ServeBench) -> anyhow::Result<ExitCode> {
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
    let mut flags = model_flags(&args.model);
    flags.extend(args.server_flags.split_whitespace().map(str::to_string));
    let server = ServerProcess::start(&flags).await?;
    let addr = server.addr.clone();

    let set = crate::dataset::RawSet::open(&args.data)?;
    let pool: Arc<Vec<odin_v1::Frame>> = Arc::new(
        (0..set.n.min(2048))
            .map(|i| odin_v1::Frame {
                image: Some(odin_v1::frame::Image::Raw(set.raw(i).into())),
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
    let rss = server.peak_rss_mib();
    drop(server);

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
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "| p99 at that load: server total / decode / wait for a worker | {:.2} / {:.2} / {:.2} ms |",
        ms(&open.stats.server_total, 0.99),
        ms(&open.stats.decode, 0.99),
        ms(&open.stats.queue, 0.99)
    );
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
