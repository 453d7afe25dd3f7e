//! A real sidecar on an ephemeral loopback port (gRPC and its HTTP
//! endpoints), the clients that talk to it, and the configurations the
//! tests serve.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use odin_sidecar::app::App;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::domain::ModelInfo;
use odin_sidecar::engine::Device;
use odin_sidecar::model::{ModelCard, ModelSource, DEFAULT_MODEL_CARD, DEFAULT_MODEL_ONNX};
use odin_sidecar::pipeline::Pipeline;
use odin_sidecar::telemetry::Telemetry;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::{Frame, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// The built-in CIFAR-10 CNN (compiled into the binary, no data needed),
/// plain max-softmax, on CPU with one intra-op thread per session.
pub fn builtin() -> ServeConfig {
    let mut config = ServeConfig::default();
    config.engine.device = Device::Cpu;
    config.engine.intra_threads = 1;
    config
}

/// The built-in model's card, as the binary carries it.
pub fn builtin_card() -> ModelCard {
    ModelCard::parse(DEFAULT_MODEL_CARD, Path::new("<embedded>")).expect("built-in card")
}

/// The built-in model written to `dir` as `NAME.onnx`, with its card edited
/// by `edit` beside it as `NAME.card.json`; returns the model's path.
pub fn write_builtin_model(
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut ModelCard),
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("model dir");
    let model = dir.join(format!("{name}.onnx"));
    std::fs::write(&model, DEFAULT_MODEL_ONNX).expect("write model");
    let mut card = builtin_card();
    edit(&mut card);
    std::fs::write(
        dir.join(format!("{name}.card.json")),
        serde_json::to_string_pretty(&card).expect("card JSON"),
    )
    .expect("write card");
    model
}

/// [`builtin`], but served from files in `dir` with the card edited by
/// `edit` (e.g. `resize = none`).
pub fn builtin_with_card(dir: &Path, edit: impl FnOnce(&mut ModelCard)) -> ServeConfig {
    let model = write_builtin_model(dir, "cnn", edit);
    ServeConfig {
        model: ModelSource::File { model, card: None },
        ..builtin()
    }
}

/// A fresh temporary directory for one test, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "odin-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sidecar serving on 127.0.0.1:<ephemeral>, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    pub telemetry: Arc<Telemetry>,
    pub app_info: ModelInfo,
    pub pipeline: Arc<Pipeline>,
    /// The readiness switch gRPC health, KServe readiness and `/readyz` report.
    pub health: odin_sidecar::server::Health,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        let app = App::build(&config).await.expect("sidecar builds");
        let app_info = app.info().clone();
        let pipeline = app.pipeline();
        let telemetry = app.telemetry();
        let health = app.health();
        let metrics_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let metrics_addr = metrics_listener.local_addr().expect("local addr");
        // Lives as long as the test's runtime.
        tokio::spawn(app.serve_http(metrics_listener, std::future::pending()));
        // Bind before spawning, so the port is ready when we return.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            app.serve(listener, shutdown).await.expect("serves");
        });
        TestServer {
            addr,
            metrics_addr,
            telemetry,
            app_info,
            pipeline,
            health,
            stop: Some(stop),
        }
    }

    /// Starts the server's shutdown, as a SIGTERM would: it drains.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connects")
    }

    pub async fn client(&self) -> DetectorClient<Channel> {
        DetectorClient::new(self.channel().await)
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics_addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `GET path` over a plain HTTP/1.1 connection: the status code and body.
pub async fn http_get(addr: impl tokio::net::ToSocketAddrs, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects to the HTTP port");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("writes request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("reads response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    (status, body.to_string())
}

/// The value of one series (`name{labels}`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse::<f64>()
        .expect("number")
}

/// Streams `frames` on one Detect call of `client` and collects every verdict.
pub async fn detect_all(mut client: DetectorClient<Channel>, frames: Vec<Frame>) -> Vec<Verdict> {
    let mut stream = client
        .detect(tokio_stream::iter(frames))
        .await
        .expect("Detect starts")
        .into_inner();
    let mut verdicts = Vec::new();
    while let Some(v) = stream.next().await {
        verdicts.push(v.expect("a verdict, not a stream error"));
    }
    verdicts
}

/// The `odin-sidecar` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_odin-sidecar");

/// A `serve` process of the real binary, started and listening.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    /// The gRPC address it logged (`addr=`), unless it serves a Unix socket.
    pub addr: Option<String>,
    /// The HTTP address it logged, with `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// Its log lines on stderr, as they come.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServeProcess {
    /// Runs `odin-sidecar serve ARGS` (with `RUST_LOG=info` and whatever
    /// `configure` adds) and waits up to a minute until it logs that it
    /// serves. Killed on drop.
    pub async fn start(
        args: &[&str],
        configure: impl FnOnce(&mut tokio::process::Command),
    ) -> ServeProcess {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut command = tokio::process::Command::new(BIN);
        command
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        configure(&mut command);
        let mut child = command.spawn().expect("starts");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut addr, mut metrics_addr) = (None, None);
        let field = |line: &str, key: &str| {
            line.split(key)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string)
        };
        let serving = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("reads stderr") {
                log.lock().expect("log").push(line.clone());
                if line.contains("Prometheus") {
                    metrics_addr = field(&line, "addr=");
                } else if line.contains("serving odin.v1.Detector") {
                    addr = field(&line, "addr=");
                    return true;
                }
            }
            false
        })
        .await
        .expect("serves within a minute");
        assert!(
            serving,
            "serve exited before serving:\n{}",
            log.lock().expect("log").join("\n")
        );
        // Keep reading, so the child never blocks on a full pipe.
        let rest = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                rest.lock().expect("log").push(line);
            }
        });
        ServeProcess {
            child,
            addr,
            metrics_addr,
            log,
        }
    }

    /// A channel to the gRPC address it logged.
    pub async fn channel(&self) -> Channel {
        let addr = self.addr.as_ref().expect("serves TCP");
        Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connects")
    }
}

/// A channel to a server on the Unix domain socket at `path`.
pub async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("connects over the Unix socket")
}

/// Stops a `serve` process the way an orchestrator does (SIGTERM) while a
/// stream on `channel` has frames in flight (32 × 32 RGB raw frames, which
/// every model here takes), and asserts that the drain answers the frames
/// it had accepted, in order and without error, then ends the stream with
/// UNAVAILABLE (the frames the client sent after it stopped being read get
/// none), and that the process then exits cleanly within 30 s.
pub async fn terminate(serve: ServeProcess, channel: Channel) {
    const FRAMES: usize = 256;
    let ServeProcess { mut child, log, .. } = serve;
    let frames: Vec<Frame> = (0..FRAMES)
        .map(|i| super::frames::raw_frame(i.to_string(), i as u64))
        .collect();
    let mut verdicts = DetectorClient::new(channel)
        .detect(tokio_stream::iter(frames))
        .await
        .expect("Detect starts")
        .into_inner();
    let first = verdicts
        .next()
        .await
        .expect("a first verdict")
        .expect("a verdict, not an error");
    assert_eq!(first.frame_id, "0");

    let pid = child.id().expect("still running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let mut answered = 1;
    let mut ending = None;
    while let Some(verdict) = verdicts.next().await {
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(status) => {
                ending = Some(status);
                break;
            }
        };
        assert_eq!(verdict.frame_id, answered.to_string(), "in order");
        assert!(
            verdict.error.is_none(),
            "{}: {:?}",
            verdict.frame_id,
            verdict.error
        );
        answered += 1;
    }
    if answered < FRAMES {
        let ending = ending.expect("a stream cut short ends with a status");
        assert_eq!(ending.code(), tonic::Code::Unavailable, "{ending:?}");
        // The frames in flight when the signal came were still answered.
        assert!(answered > 1, "only the first frame was answered");
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s")
        .expect("exit status");
    assert!(
        status.success(),
        "{status:?}\n{}",
        log.lock().expect("log").join("\n")
    );
}
