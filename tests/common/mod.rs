//! Shared test harness: a real sidecar on an ephemeral loopback port, real
//! data from `../shared/data`, and helpers that compute expected answers
//! independently of the pipeline's own preprocessing.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use odin_sidecar::app::App;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::dataset::{shared_data_dir, RawSet};
use odin_sidecar::model::ModelSource;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// ImageNet normalization of the akamaster ResNets.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet normalization of the akamaster ResNets.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

pub fn data_dir() -> PathBuf {
    shared_data_dir()
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Serving config for the real ResNet-20 from `shared/data`, on CPU.
pub fn resnet20() -> ServeConfig {
    let mut config = ServeConfig {
        model: ModelSource::File {
            model: data_dir().join("models/resnet20_cifar10.onnx"),
            card: Some(repo_dir().join("models/resnet20_cifar10.card.json")),
        },
        ..ServeConfig::default()
    };
    config.engine.device = odin_sidecar::engine::Device::Cpu;
    config.engine.intra_threads = 1;
    config
}

pub fn cifar10_test() -> RawSet {
    RawSet::open(&data_dir().join("cifar10_test.u8")).expect("shared/data/cifar10_test.u8 readable")
}

pub fn tin_crop() -> RawSet {
    RawSet::open(&data_dir().join("tin_crop.u8")).expect("shared/data/tin_crop.u8 readable")
}

/// A sidecar serving on 127.0.0.1:<ephemeral>, stopped on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `GET /metrics` is served.
    pub metrics_addr: SocketAddr,
    pub telemetry: std::sync::Arc<odin_sidecar::telemetry::Telemetry>,
    pub app_info: odin_sidecar::domain::ModelInfo,
    pub pipeline: std::sync::Arc<odin_sidecar::pipeline::Pipeline>,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(config: ServeConfig) -> TestServer {
        let app = App::build(&config).await.expect("sidecar builds");
        let app_info = app.info().clone();
        let pipeline = app.pipeline();
        let telemetry = app.telemetry();
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
            stop: Some(stop),
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

    /// `GET /metrics` over a plain TCP connection: the Prometheus text.
    pub async fn scrape(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .expect("connects to /metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .expect("writes request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("reads response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// `(p/255 - mean)/std`, HWC u8 → CHW f32, written independently of the
/// pipeline's preprocessor.
pub fn normalize(hwc: &[u8], mean: &[f32], std: &[f32]) -> Vec<f32> {
    let c = mean.len();
    let plane = hwc.len() / c;
    let mut out = vec![0.0f32; hwc.len()];
    for i in 0..plane {
        for ch in 0..c {
            out[ch * plane + i] = (f32::from(hwc[i * c + ch]) / 255.0 - mean[ch]) / std[ch];
        }
    }
    out
}

/// Max softmax at T = 1 in f64, independent of the crate's scorer.
pub fn reference_max_softmax(logits: &[f32]) -> f64 {
    let max = logits
        .iter()
        .map(|v| f64::from(*v))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|v| (f64::from(*v) - max).exp()).sum();
    1.0 / sum
}

#[allow(unused_imports)]
pub use odin_sidecar::score::argmax;

/// A single-threaded CPU engine for `config`'s model, without the gradient
/// graph: the in-process reference the served answers are checked against.
pub fn reference_engine(config: &ServeConfig) -> odin_sidecar::engine::Engine {
    let model = odin_sidecar::model::Model::load(&config.model).expect("model loads");
    let options = odin_sidecar::engine::EngineOptions {
        device: odin_sidecar::engine::Device::Cpu,
        intra_threads: 1,
        fused: true,
    };
    odin_sidecar::engine::Engine::load(&model, None, &options).expect("engine builds")
}

pub fn encode(pixels: &[u8], width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_raw(width, height, pixels.to_vec()).expect("dims");
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)
        .expect("encodes");
    out
}

/// Streams `frames` on one Detect call of `client` and collects every verdict.
pub async fn detect_all(
    mut client: DetectorClient<Channel>,
    frames: Vec<odin_sidecar::wire::odin_v1::Frame>,
) -> Vec<odin_sidecar::wire::odin_v1::Verdict> {
    use tokio_stream::StreamExt;
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

/// Stops a `serve` process the way an orchestrator does (SIGTERM) and
/// asserts that it drains and exits cleanly within 30 s.
pub async fn terminate(mut child: tokio::process::Child) {
    let pid = child.id().expect("still running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("exits within 30 s")
        .expect("exit status");
    assert!(status.success(), "{status:?}");
}
