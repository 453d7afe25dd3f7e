//! `bench overload` and `bench soak`: the server as its own process under
//! more load than it can take, and under steady load for minutes.
//!
//! Overload: a short closed-loop run finds the saturating rate; then streams
//! and unary calls together offer several times that rate, open loop, while
//! the server's resident memory and held-frame bytes are sampled. Every
//! frame sent must come back as a verdict or be refused with a status (the
//! table counts both, and any frame lost). Last, a SIGTERM during load
//! measures how long the drain takes. Soak: half the saturating rate for
//! minutes, resident memory each minute.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::serve::model_flags;
use super::ServerProcess;
use crate::cli::ModelArgs;
use crate::loadgen::{self, LoadConfig, Mode, Pacing, Report, Target};
use crate::wire::odin_v1::{frame::Image, Frame, RawImage};

/// Flags of `bench overload`.
#[derive(Debug, Clone, Args)]
pub struct OverloadBench {
    /// Seconds of overload.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Offered load as a multiple of the saturating rate.
    #[arg(long, default_value_t = 5.0)]
    pub factor: f64,
    /// Size of the raw RGB frames sent, WIDTHxHEIGHT (large frames stress
    /// the memory budget).
    #[arg(long, default_value = "1280x720")]
    pub frame_size: String,
    /// Extra flags for the server process (`serve`), e.g. "--memory-budget-mib 128".
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub server_flags: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Flags of `bench soak`.
#[derive(Debug, Clone, Args)]
pub struct SoakBench {
    /// Minutes of load.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Offered load as a fraction of the saturating rate.
    #[arg(long, default_value_t = 0.5)]
    pub load: f64,
    /// Size of the raw RGB frames sent, WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480")]
    pub frame_size: String,
    /// Extra flags for the server process (`serve`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub server_flags: String,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `count` distinct raw RGB frames of `size` ("WxH"), smooth gradients with
/// noise so that nothing about them is degenerate.
pub(super) fn raw_frames(size: &str, count: usize) -> anyhow::Result<Arc<Vec<Frame>>> {
    let (w, h) = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("frame size {size:?} is not WIDTHxHEIGHT"))?;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let frames = (0..count)
        .map(|k| {
            let mut pixels = Vec::with_capacity((w * h * 3) as usize);
            for y in 0..h {
                for x in 0..w {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let noise = (state >> 59) as u32;
                    pixels.extend([
                        ((x * 255 / w.max(1) + noise) % 256) as u8,
                        ((y * 255 / h.max(1) + noise * 3) % 256) as u8,
                        ((k as u32 * 40 + noise * 5) % 256) as u8,
                    ]);
                }
            }
            Frame {
                frame_id: format!("bench-{k}"),
                image: Some(Image::Raw(RawImage {
                    width: w,
                    height: h,
                    channels: 3,
                    pixels,
                })),
                ..Frame::default()
            }
        })
        .collect();
    Ok(Arc::new(frames))
}

fn load(
    addr: &str,
    mode: Mode,
    connections: usize,
    streams: usize,
    pacing: Pacing,
    seconds: f64,
    pool: &Arc<Vec<Frame>>,
) -> LoadConfig {
    LoadConfig {
        target: Target::Tcp(addr.to_string()),
        mode,
        connections,
        streams,
        pacing,
        duration: Some(Duration::from_secs_f64(seconds)),
        frames: None,
        warmup: Duration::from_secs(1),
        pool: Arc::clone(pool),
    }
}

/// The saturating rate of the server: a closed-loop stream run.
async fn saturating_rate(addr: &str, pool: &Arc<Vec<Frame>>) -> anyhow::Result<f64> {
    let probe = load(
        addr,
        Mode::Stream,
        2,
        4,
        Pacing::Closed { in_flight: 8 },
        8.0,
        pool,
    );
    let report = loadgen::run(probe, false).await?;
    Ok(report.frames_per_second())
}

fn server_flags(model: &ModelArgs, extra: &str) -> Vec<String> {
    let mut flags = model_flags(model);
    flags.extend(extra.split_whitespace().map(str::to_string));
    flags
}

/// Peaks of the server's memory while `stop` is false.
async fn sample_memory(server: &ServerProcess, stop: &AtomicBool) -> (f64, f64) {
    let (mut rss, mut held) = (0.0f64, 0.0f64);
    while !stop.load(Ordering::Relaxed) {
        rss = rss.max(server.rss_mib().unwrap_or(0.0));
        held = held
            .max(server.metric("odin_frames_held_bytes").await.unwrap_or(0.0) / f64::from(1 << 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (rss, held)
}

fn row(name: &str, r: &Report) {
    let s = &r.stats;
    let judged = s.in_distribution + s.out_of_distribution;
    let refused: Vec<String> = s.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let lost = r.sent.saturating_sub(s.answered);
    println!(
        "| {name} | {} | {} | {judged} | {} | {lost} | {:.1} | {:.1} |",
        r.sent,
        s.answered,
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        },
        r.judged_latency_ms(0.5),
        r.judged_latency_ms(0.99),
    );
}

/// Runs `bench overload`.
pub async fn run(args: &OverloadBench) -> anyhow::Result<ExitCode> {
    let pool = raw_frames(&args.frame_size, 8)?;
    let server = ServerProcess::start(&server_flags(&args.model, &args.server_flags)).await?;
    let addr = server.addr.clone();
    let saturating = saturating_rate(&addr, &pool).await?;
    let idle_rss = server.rss_mib().unwrap_or(0.0);
    let offered = saturating * args.factor;
    eprintln!(
        "saturating at {saturating:.0} frames/s; offering {offered:.0} frames/s for {} s",
        args.seconds
    );

    let stop = AtomicBool::new(false);
    let streams = load(
        &addr,
        Mode::Stream,
        2,
        4,
        Pacing::Open {
            rate: offered / 2.0,
        },
        args.seconds,
        &pool,
    );
    let unary = load(
        &addr,
        Mode::Unary,
        2,
        8,
        Pacing::Open {
            rate: offered / 2.0,
        },
        args.seconds,
        &pool,
    );
    let loads = async {
        let both = tokio::join!(loadgen::run(streams, false), loadgen::run(unary, false));
        stop.store(true, Ordering::Relaxed);
        both
    };
    let ((streamed, called), (peak_rss, peak_held)) =
        tokio::join!(loads, sample_memory(&server, &stop));
    let (streamed, called) = (streamed?, called?);
    let budget = server
        .metric("odin_frames_budget_bytes")
        .await
        .map(|b| b / f64::from(1 << 20));

    // The drain: SIGTERM while streams are busy.
    let busy = load(
        &addr,
        Mode::Stream,
        2,
        4,
        Pacing::Closed { in_flight: 8 },
        30.0,
        &pool,
    );
    let drained = tokio::spawn(loadgen::run(busy, false));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak_total = server.peak_rss_mib();
    let (status, drain) = server.terminate().await?;
    let during_drain = drained.await??;

    println!("| run | sent | answered | judged | refused or failed, by reason | lost | p50 judged (ms) | p99 judged (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    row("streams", &streamed);
    row("unary", &called);
    row("streams during SIGTERM", &during_drain);
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| saturating rate (closed loop) | {saturating:.0} frames/s |");
    println!(
        "| offered during overload | {offered:.0} frames/s ({}× for {} s), {} frames |",
        args.factor, args.seconds, args.frame_size
    );
    println!("| server RSS idle after warm-up | {idle_rss:.0} MiB |");
    println!("| server RSS peak during overload (sampled every 200 ms) | {peak_rss:.0} MiB |");
    println!(
        "| server RSS peak over the whole run (VmHWM) | {} |",
        peak_total.map_or("unavailable".into(), |r| format!("{r:.0} MiB"))
    );
    println!(
        "| frames held, peak / memory budget | {peak_held:.0} MiB / {} |",
        budget.map_or("unknown".into(), |b| format!("{b:.0} MiB"))
    );
    println!(
        "| drain: SIGTERM to exit, with 8 busy streams | {:.2} s, {status} |",
        drain.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `bench soak`.
pub async fn soak(args: &SoakBench) -> anyhow::Result<ExitCode> {
    let pool = raw_frames(&args.frame_size, 8)?;
    let server = ServerProcess::start(&server_flags(&args.model, &args.server_flags)).await?;
    let addr = server.addr.clone();
    let saturating = saturating_rate(&addr, &pool).await?;
    let rate = saturating * args.load;
    eprintln!(
        "saturating at {saturating:.0} frames/s; soaking at {rate:.0} frames/s for {} min",
        args.minutes
    );
    let seconds = args.minutes as f64 * 60.0;
    let soak = load(
        &addr,
        Mode::Stream,
        2,
        4,
        Pacing::Open { rate },
        seconds,
        &pool,
    );
    let running = tokio::spawn(loadgen::run(soak, false));
    let started = Instant::now();
    println!("| minute | server RSS (MiB) | frames held (MiB) |");
    println!("|---|---|---|");
    for minute in 1..=args.minutes {
        let at = started + Duration::from_secs(60 * minute);
        tokio::time::sleep_until(at.into()).await;
        let held =
            server.metric("odin_frames_held_bytes").await.unwrap_or(0.0) / f64::from(1 << 20);
        println!(
            "| {minute} | {} | {held:.1} |",
            server
                .rss_mib()
                .map_or("unavailable".into(), |r| format!("{r:.1}"))
        );
    }
    let report = running.await??;
    println!();
    println!(
        "{} frames sent, {} answered, {} errors, p99 of judged frames {:.1} ms",
        report.sent,
        report.stats.answered,
        report.stats.error_count(),
        report.judged_latency_ms(0.99)
    );
    Ok(ExitCode::SUCCESS)
}
