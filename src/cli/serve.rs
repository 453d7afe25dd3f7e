//! `odin-sidecar serve`: load, warm up, serve until SIGINT/SIGTERM, drain
//! within the grace period; a second signal exits at once. SIGHUP reloads
//! the model and calibration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::ModelArgs;
use crate::app::App;
use crate::config::{self, ConfigError, NetworkOptions, ServeConfig, TlsFiles};
use crate::server::conn::Listener;
use crate::telemetry::OtlpConfig;

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TCP address to listen on [default: 127.0.0.1:50051, unless --uds
    /// is given].
    #[arg(long, env = "ODIN_ADDR")]
    pub addr: Option<SocketAddr>,
    /// Listen on this Unix domain socket (for a sidecar sharing a pod or
    /// host with its client); with --addr too, on both. A stale socket left
    /// by an earlier run is replaced; any other file there is refused.
    #[arg(long, env = "ODIN_UDS")]
    pub uds: Option<PathBuf>,
    /// File mode of the Unix socket, in octal.
    #[arg(long, default_value = "660", env = "ODIN_UDS_MODE", value_parser = octal)]
    pub uds_mode: u32,
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
    pub limits: LimitArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Every bound on memory, connections and time, with its flag.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Bytes of frames the server holds at once, over all streams and
    /// calls, in MiB: when full, streams stop being read and unary calls get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = config::DEFAULT_MEMORY_BUDGET >> 20, env = "ODIN_MEMORY_BUDGET_MIB")]
    pub memory_budget_mib: usize,
    /// Bytes of request messages being received at once, over all calls,
    /// in MiB, counted from each message's length prefix until its frames
    /// are admitted: when full, streams stop being read and unary calls get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = config::DEFAULT_RECEIVE_BUDGET >> 20, env = "ODIN_RECEIVE_BUDGET_MIB")]
    pub receive_budget_mib: usize,
    /// Frames one stream may have in flight before it stops being read.
    #[arg(long, default_value_t = crate::pipeline::order::DEFAULT_WINDOW, env = "ODIN_STREAM_WINDOW")]
    pub stream_window: usize,
    /// Frames one client (connection) may have waiting for the engine
    /// before its submitters wait.
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_CAPACITY, env = "ODIN_QUEUE_CAPACITY")]
    pub queue_capacity: usize,
    /// Largest image a frame may decode to, in pixels (checked from its
    /// header before anything is allocated).
    #[arg(long, default_value_t = config::DEFAULT_MAX_PIXELS, env = "ODIN_MAX_PIXELS")]
    pub max_pixels: u64,
    /// Accepted range of tensor-frame values, as MIN,MAX [default: what the
    /// card's normalization makes of pixels in 0..=255, widened by 1].
    #[arg(long, env = "ODIN_TENSOR_RANGE", value_parser = range)]
    pub tensor_range: Option<(f32, f32)>,
    /// Longest frame_id, in bytes.
    #[arg(long, default_value_t = config::DEFAULT_FIELD_LIMITS.max_id_bytes, env = "ODIN_MAX_FRAME_ID_BYTES")]
    pub max_frame_id_bytes: usize,
    /// Most attributes per frame.
    #[arg(long, default_value_t = config::DEFAULT_FIELD_LIMITS.max_attributes, env = "ODIN_MAX_ATTRIBUTES")]
    pub max_attributes: usize,
    /// Longest attribute (key plus value), in bytes.
    #[arg(long, default_value_t = config::DEFAULT_FIELD_LIMITS.max_attribute_bytes, env = "ODIN_MAX_ATTRIBUTE_BYTES")]
    pub max_attribute_bytes: usize,
    /// Open connections beyond which a new one is closed at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS, env = "ODIN_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Calls (HTTP/2 streams) one connection may have open.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONCURRENT_STREAMS, env = "ODIN_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval, in seconds.
    #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_INTERVAL.as_secs_f64(), env = "ODIN_KEEPALIVE_INTERVAL_S")]
    pub keepalive_interval_s: f64,
    /// Seconds a keepalive ping may go unanswered before the connection closes.
    #[arg(long, default_value_t = config::DEFAULT_KEEPALIVE_TIMEOUT.as_secs_f64(), env = "ODIN_KEEPALIVE_TIMEOUT_S")]
    pub keepalive_timeout_s: f64,
    /// Seconds a connection may stay open with no call before it is closed.
    #[arg(long, default_value_t = config::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), env = "ODIN_IDLE_TIMEOUT_S")]
    pub idle_timeout_s: f64,
    /// Seconds a new connection gets for its TLS handshake and first call.
    #[arg(long, default_value_t = config::DEFAULT_HANDSHAKE_TIMEOUT.as_secs_f64(), env = "ODIN_HANDSHAKE_TIMEOUT_S")]
    pub handshake_timeout_s: f64,
    /// Age in seconds after which a connection is asked to go away (GOAWAY),
    /// so clients rebalance across replicas [default: never].
    #[arg(long, env = "ODIN_MAX_CONNECTION_AGE_S")]
    pub max_connection_age_s: Option<f64>,
    /// Seconds the calls of an aged-out connection get to finish.
    #[arg(long, default_value_t = 30.0, env = "ODIN_MAX_CONNECTION_AGE_GRACE_S")]
    pub max_connection_age_grace_s: f64,
    /// Stream resets the server may generate on one connection before it is
    /// sent GOAWAY.
    #[arg(long, default_value_t = config::DEFAULT_MAX_LOCAL_RESETS, env = "ODIN_MAX_RESETS")]
    pub max_resets: usize,
    /// Longest a DetectOne call may take, in seconds; a client's shorter
    /// grpc-timeout wins [default: no limit].
    #[arg(long, env = "ODIN_REQUEST_TIMEOUT_S")]
    pub request_timeout_s: Option<f64>,
    /// Seconds a shutdown waits for accepted frames to be answered.
    #[arg(long, default_value_t = config::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(), env = "ODIN_SHUTDOWN_GRACE_S")]
    pub shutdown_grace_s: f64,
    /// TLS certificate chain (PEM); reloaded when the file changes.
    #[arg(long, env = "ODIN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); reloaded when the file changes.
    #[arg(long, env = "ODIN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to: mutual TLS.
    #[arg(long, env = "ODIN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// A file whose first line is the bearer token every call but health
    /// must present (`authorization: Bearer <token>`).
    #[arg(long, env = "ODIN_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
}

impl LimitArgs {
    /// Applies the flags to `config`.
    pub fn apply(&self, config: &mut ServeConfig, uds_mode: u32) -> Result<(), ConfigError> {
        config.memory_budget = self.memory_budget_mib.saturating_mul(1 << 20);
        config.stream_window = self.stream_window;
        config.batch.queue_capacity = self.queue_capacity;
        config.max_pixels = self.max_pixels;
        config.tensor_range = self.tensor_range;
        config.fields.max_id_bytes = self.max_frame_id_bytes;
        config.fields.max_attributes = self.max_attributes;
        config.fields.max_attribute_bytes = self.max_attribute_bytes;
        config.network = NetworkOptions {
            receive_budget: self.receive_budget_mib.saturating_mul(1 << 20),
            max_connections: self.max_connections,
            max_concurrent_streams: self.max_concurrent_streams,
            keepalive_interval: seconds("--keepalive-interval-s", self.keepalive_interval_s)?,
            keepalive_timeout: seconds("--keepalive-timeout-s", self.keepalive_timeout_s)?,
            idle_timeout: seconds("--idle-timeout-s", self.idle_timeout_s)?,
            handshake_timeout: seconds("--handshake-timeout-s", self.handshake_timeout_s)?,
            max_connection_age: self
                .max_connection_age_s
                .map(|s| seconds("--max-connection-age-s", s))
                .transpose()?,
            max_connection_age_grace: seconds(
                "--max-connection-age-grace-s",
                self.max_connection_age_grace_s,
            )?,
            max_local_resets: self.max_resets,
            request_timeout: self
                .request_timeout_s
                .map(|s| seconds("--request-timeout-s", s))
                .transpose()?,
            shutdown_grace: seconds("--shutdown-grace-s", self.shutdown_grace_s)?,
            uds_mode,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
            auth_token_file: self.auth_token_file.clone(),
        };
        Ok(())
    }
}

fn seconds(flag: &str, value: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| ConfigError(format!("{flag} must be a non-negative number, got {value}")))
}

fn octal(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not a file mode in octal, such as 660"))
}

fn range(text: &str) -> Result<(f32, f32), String> {
    let bad = || format!("{text:?} is not MIN,MAX with MIN < MAX");
    let (lo, hi) = text.split_once(',').ok_or_else(bad)?;
    let (lo, hi): (f32, f32) = (
        lo.trim().parse().map_err(|_| bad())?,
        hi.trim().parse().map_err(|_| bad())?,
    );
    (lo < hi).then_some((lo, hi)).ok_or_else(bad)
}

/// Runs `serve`.
pub async fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = args.model.config()?;
    args.limits.apply(&mut config, args.uds_mode)?;
    if args.otlp {
        config.otlp = Some(OtlpConfig::default());
    }
    let app = App::build(&config).await?;
    if let Some(addr) = args.metrics_addr {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving Prometheus /metrics, /healthz and /readyz over HTTP");
        // Lives as long as the process: scrapes and probes may come during the drain.
        let http = app.serve_http(listener, std::future::pending());
        tokio::spawn(async move {
            if let Err(e) = http.await {
                tracing::error!(error = %e, "HTTP endpoints stopped");
            }
        });
    }
    // SIGHUP reloads the model and calibration files (so does a change of
    // either file, noticed within two seconds).
    let reloader = app.reloader();
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the model and calibration");
            if let Err(e) = reloader.reload().await {
                tracing::error!(error = %e, "reload refused; the previous version serves on");
            }
        }
    });
    // The first SIGINT/SIGTERM drains; a second one exits at once.
    let (first, drain) = oneshot::channel::<()>();
    let (second, forced) = oneshot::channel::<()>();
    tokio::spawn(async move {
        termination().await;
        tracing::info!("shutdown requested; draining (a second signal exits at once)");
        let _ = first.send(());
        termination().await;
        let _ = second.send(());
    });
    let drain = async move {
        let _ = drain.await;
    };
    let mut listeners = Vec::new();
    let addr = match (&args.uds, args.addr) {
        (None, None) => Some(config::DEFAULT_ADDR.parse()?),
        (_, addr) => addr,
    };
    if let Some(addr) = addr {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && config.network.tls.is_none() {
            tracing::warn!(
                %addr,
                "listening beyond loopback without TLS: frames and tokens travel in clear text \
                 (set --tls-cert and --tls-key)"
            );
        }
        tracing::info!(%addr, "serving odin.v1.Detector");
        listeners.push(Listener::Tcp(listener));
    }
    if let Some(path) = &args.uds {
        listeners.push(Listener::Unix(bind_unix(path, args.uds_mode)?));
        tracing::info!(uds = %path.display(), "serving odin.v1.Detector");
    }
    let serving = async {
        let served = app.serve_on(listeners, drain).await;
        if let Some(path) = &args.uds {
            let _ = std::fs::remove_file(path);
        }
        Ok::<(), anyhow::Error>(served?)
    };
    tokio::select! {
        served = serving => served?,
        Ok(()) = forced => {
            tracing::warn!("second signal: exiting without finishing the drain");
            return Ok(ExitCode::from(130));
        }
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Binds a Unix socket at `path` with file mode `mode`. A socket already
/// there is a leftover of an earlier run when nothing answers on it, and is
/// replaced; anything else at `path` (a regular file, a live socket) is
/// refused rather than deleted.
fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ConfigError(format!(
                "--uds {}: a file that is not a socket is already there; refusing to replace it",
                path.display()
            ))
            .into());
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ConfigError(format!(
                    "--uds {}: another server is listening on this socket",
                    path.display()
                ))
                .into());
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Completes on SIGINT or SIGTERM.
async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_ranges_parse() {
        assert_eq!(octal("660"), Ok(0o660));
        assert_eq!(octal("0o600"), Ok(0o600));
        assert!(octal("999").is_err());
        assert!(octal("7777").is_err());
        assert_eq!(range("-3,3.5"), Ok((-3.0, 3.5)));
        assert!(range("3,-3").is_err());
        assert!(range("nan,1").is_err());
        assert!(range("1").is_err());
    }

    #[test]
    fn a_regular_file_is_never_replaced_by_the_socket() {
        let dir = std::env::temp_dir().join(format!("odin-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("not-a-socket");
        std::fs::write(&path, b"precious").expect("write");
        let error = bind_unix(&path, 0o660).expect_err("refused");
        assert!(error.to_string().contains("not a socket"), "{error}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
