//! What every reliability test needs: a real sidecar (in-process on a
//! loopback port, or the real binary), clients that can send bytes the
//! generated client never would, frames of every size, and readers for
//! `/metrics` and the binary's log.
// Each test module uses what it needs of these.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BufMut;
use odin_sidecar::app::App;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::pipeline::Pipeline;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, RawImage, Verdict};
use prost::Message;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Status};

pub use crate::common::{detect_all, http_get, metric, BIN};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tests whose assertions depend on time or CPU (fairness, deadlines,
/// timeouts, drains) take this lock, so they never share the two cores
/// with each other.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// The built-in CIFAR-10 model on CPU, one intra-op thread per worker.
pub fn config() -> ServeConfig {
    let mut config = ServeConfig::default();
    config.engine.device = odin_sidecar::engine::Device::Cpu;
    config.engine.intra_threads = 1;
    config
}

/// A sidecar served in-process on 127.0.0.1:<ephemeral>, with its HTTP
/// endpoints on another port. Shut down (drained) when dropped or stopped.
pub struct Server {
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub pipeline: Arc<Pipeline>,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    pub async fn start(config: ServeConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Server::start_on(config, listener).await
    }

    pub async fn start_on(config: ServeConfig, listener: TcpListener) -> Server {
        let app = App::build(&config).await.expect("the sidecar builds");
        let pipeline = app.pipeline();
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics = http.local_addr().expect("addr");
        tokio::spawn(app.serve_http(http, std::future::pending()));
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.serve(listener, async {
            let _ = stopped.await;
        }));
        Server {
            addr,
            metrics,
            pipeline,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A new HTTP/2 connection.
    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// A Detector client on a new connection.
    pub async fn client(&self) -> DetectorClient<Channel> {
        DetectorClient::new(self.channel().await)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn scrape(&self) -> String {
        scrape(self.metrics).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A new HTTP/2 connection to `addr`.
pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connects")
}

/// The Prometheus text of `/metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// Polls `/metrics` until `name` equals `want` (gauges settle after the
/// last answer is sent); returns the last value seen.
pub async fn settle(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric(&scrape(addr).await, name);
        if value == want || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A deterministic byte generator (the crate's SplitMix64).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = odin_sidecar::calib::sets::SplitMix64(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A frame of raw RGB pixels.
pub fn raw_frame(id: &str, width: u32, height: u32, pixels: Vec<u8>) -> Frame {
    Frame {
        frame_id: id.into(),
        image: Some(Image::Raw(RawImage {
            width,
            height,
            channels: 3,
            pixels,
        })),
        ..Frame::default()
    }
}

/// A good 32×32 frame: the model's own size, cheap to judge.
pub fn tiny(id: &str) -> Frame {
    raw_frame(id, 32, 32, noise(32 * 32 * 3, 7))
}

/// A frame carrying encoded JPEG/PNG bytes.
pub fn encoded_frame(id: &str, bytes: Vec<u8>) -> Frame {
    Frame {
        frame_id: id.into(),
        image: Some(Image::Encoded(bytes)),
        ..Frame::default()
    }
}

/// An RGB image encoded as `format`.
pub fn encode(image: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .expect("encodes");
    out
}

/// A `side`×`side` PNG of a repeating pattern: a few KB on the wire, but
/// `side`² pixels to inflate and resize, so slow to decode (about 130 ms for
/// 2048 in a debug build on this machine).
pub fn slow_png(side: u32) -> Vec<u8> {
    pattern_png(side, side)
}

/// A `width`×`height` PNG of a repeating pattern (compresses well).
pub fn pattern_png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 7) as u8 * 30, (y % 5) as u8 * 40, ((x ^ y) % 3) as u8])
    });
    encode(&image, image::ImageFormat::Png)
}

/// The frame's error reason, or "" for a verdict.
pub fn reason(verdict: &Verdict) -> &str {
    verdict.error.as_ref().map_or("", |e| e.reason.as_str())
}

/// The frame's error code, or 0 for a verdict.
pub fn code(verdict: &Verdict) -> i32 {
    verdict.error.as_ref().map_or(0, |e| e.code)
}

/// Asserts that `verdict` is a real answer (no per-frame error).
pub fn assert_judged(verdict: &Verdict) {
    assert!(
        verdict.error.is_none(),
        "frame {:?} got an error: {:?}",
        verdict.frame_id,
        verdict.error
    );
    assert!(
        verdict.max_softmax > 0.0 && !verdict.method.is_empty(),
        "{verdict:?}"
    );
}

/// A codec that sends `Vec<u8>` exactly as given, so tests can put bytes on
/// the wire that no generated client would, and reads back `Verdict`s.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

/// See [`RawCodec`].
#[derive(Debug)]
pub struct RawEncoder;

/// See [`RawCodec`].
#[derive(Debug)]
pub struct VerdictDecoder;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Verdict;
    type Encoder = RawEncoder;
    type Decoder = VerdictDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> VerdictDecoder {
        VerdictDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for VerdictDecoder {
    type Item = Verdict;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Verdict>, Status> {
        Verdict::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("the test cannot decode a Verdict: {e}")))
    }
}

fn path(method: &str) -> http::uri::PathAndQuery {
    format!("/odin.v1.Detector/{method}")
        .parse()
        .expect("a path")
}

/// `DetectOne` with `message` as the request's bytes.
pub async fn raw_detect_one(channel: Channel, message: Vec<u8>) -> Result<Verdict, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    grpc.unary(Request::new(message), path("DetectOne"), RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// A `Detect` stream sending `messages` as they are: the verdicts received,
/// then how the stream ended.
pub async fn raw_detect(channel: Channel, messages: Vec<Vec<u8>>) -> (Vec<Verdict>, Status) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let request = Request::new(tokio_stream::iter(messages));
    let mut stream = match grpc.streaming(request, path("Detect"), RawCodec).await {
        Ok(response) => response.into_inner(),
        Err(status) => return (Vec::new(), status),
    };
    let mut verdicts = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(verdict)) => verdicts.push(verdict),
            Ok(None) => return (verdicts, Status::ok("")),
            Err(status) => return (verdicts, status),
        }
    }
}

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "odin-rel-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real binary running `serve`, its stderr collected as it comes.
pub struct Proc {
    pub child: tokio::process::Child,
    pub pid: u32,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// `odin-sidecar serve --device cpu ARGS`.
    pub fn serve(args: &[&str]) -> Proc {
        let mut command = tokio::process::Command::new(BIN);
        command.args(["serve", "--device", "cpu"]).args(args);
        Proc::spawn(command)
    }

    /// Runs `command` with stderr captured (the log) and stdout discarded.
    pub fn spawn(mut command: tokio::process::Command) -> Proc {
        command
            .env("RUST_LOG", "info")
            .env("ODIN_LOG_FORMAT", "human")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the binary starts");
        let pid = child.id().expect("running");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Proc { child, pid, log }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for a log line containing `needle` and returns it; panics
    /// with the whole log after `timeout`, or if the process exits first.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader catch the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                panic!(
                    "exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log after {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gRPC address from the `serving odin.v1.Detector addr=…` line.
    pub async fn addr(&mut self) -> SocketAddr {
        let line = self
            .wait_log("serving odin.v1.Detector", Duration::from_secs(60))
            .await;
        field(&line, "addr=")
    }

    /// The HTTP address from the `serving Prometheus … addr=…` line.
    pub async fn metrics_addr(&mut self) -> SocketAddr {
        let line = self
            .wait_log("serving Prometheus", Duration::from_secs(60))
            .await;
        field(&line, "addr=")
    }

    /// Sends `signal` (a `kill` name: TERM, KILL, ...).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.pid);
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .map(|s| s.expect("exit status"))
    }
}

fn field(line: &str, key: &str) -> SocketAddr {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    line[start..]
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("an address after {key} in {line}"))
}

/// CPU time (user + system) the process `pid` has used, from
/// `/proc/PID/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// grpcurl, from `$ODIN_GRPCURL` or `.venv-test/bin/grpcurl`.
pub fn grpcurl() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("ODIN_GRPCURL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-test/bin/grpcurl"));
    path.exists().then_some(path)
}

/// Records a skipped check: printed, and logged for `scripts/test.sh`.
pub fn skip(test: &str, why: &str) {
    let line = format!("reliability::{test}: skipped: {why}");
    println!("{line}");
    if let Some(dir) = std::env::var_os("ODIN_SKIP_LOG") {
        let file = Path::new(&dir).join(format!("reliability-{}", test.replace("::", "-")));
        let _ = std::fs::write(file, format!("{line}\n"));
    }
}
