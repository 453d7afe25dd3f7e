//! `odin-sidecar serve`: load, warm up, serve until SIGINT/SIGTERM, drain.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use tokio::net::TcpListener;

use super::ModelArgs;
use crate::app::App;
use crate::config::DEFAULT_ADDR;
use crate::telemetry::OtlpConfig;

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_ADDR, env = "ODIN_ADDR")]
    pub addr: SocketAddr,
    /// Listen on this Unix domain socket instead of TCP (for a sidecar
    /// sharing a pod or host with its client).
    #[arg(long, env = "ODIN_UDS")]
    pub uds: Option<std::path::PathBuf>,
    /// Export a trace span per frame over OTLP/gRPC. The standard variables
    /// configure it: OTEL_EXPORTER_OTLP_ENDPOINT (default
    /// http://localhost:4317), OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER and
    /// OTEL_TRACES_SAMPLER_ARG, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*.
    #[arg(long, env = "ODIN_OTLP", value_parser = clap::builder::FalseyValueParser::new())]
    pub otlp: bool,
    /// Serve plain HTTP at ADDR, e.g. 127.0.0.1:9464 (off unless given):
    /// Prometheus metrics at /metrics, and /healthz and /readyz for probes
    /// that cannot speak gRPC.
    #[arg(long, env = "ODIN_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.model.config()?;
    if args.otlp {
        config.otlp = Some(OtlpConfig::default());
    }
    let app = App::build(&config).await?;
    if let Some(addr) = args.metrics_addr {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving Prometheus /metrics, /healthz and /readyz over HTTP");
        // Lives as long as the process: scrapes may come during the drain.
        let http = app.serve_http(listener, std::future::pending());
        tokio::spawn(async move {
            if let Err(e) = http.await {
                tracing::error!(error = %e, "HTTP endpoints stopped");
            }
        });
    }
    if let Some(path) = &args.uds {
        // A socket file left by a previous run would make bind fail.
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        tracing::info!(uds = %path.display(), "serving odin.v1.Detector");
        app.serve_unix(listener, shutdown_signal()).await?;
        let _ = std::fs::remove_file(path);
    } else {
        let listener = TcpListener::bind(args.addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving odin.v1.Detector");
        app.serve(listener, shutdown_signal()).await?;
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown requested; draining");
}
