//! `bench tracing`: the cost of tracing every frame — end-to-end frames/s
//! over gRPC with spans off vs on (always_on, exported over OTLP/gRPC to a
//! receiver), two in-process servers driven in turn by `loadgen`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;

use crate::app::App;
use crate::cli::ModelArgs;
use crate::loadgen::{self, LoadConfig, Mode, Pacing, Target};
use crate::telemetry::OtlpConfig;

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

/// Runs `bench tracing`.
pub async fn run(args: &TracingBench) -> anyhow::Result<ExitCode> {
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
    let pool = Arc::new(crate::cli::loadgen::frames(args.data.as_ref())?);
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
