//! Live reload: a new calibration or model is put in force while streams
//! run; no frame is lost, frames after the switch use the new version, and
//! a broken file is refused while the old version serves on. The built-in
//! model, copied to a temporary folder, so no data is needed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use odin_sidecar::app::{App, Reloaded, Reloader};
use odin_sidecar::config::{CalibrationSource, ServeConfig};
use odin_sidecar::engine::Device;
use odin_sidecar::model::ModelSource;
use odin_sidecar::wire::odin_v1::{
    detector_client::DetectorClient, frame::Image, Frame, GetModelInfoRequest, RawImage, Verdict,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

struct Server {
    addr: String,
    reloader: Reloader,
    _stop: oneshot::Sender<()>,
}

async fn serve(config: ServeConfig) -> Server {
    let app = App::build(&config).await.expect("builds");
    let reloader = app.reloader();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = app
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await;
    });
    Server {
        addr,
        reloader,
        _stop: stop,
    }
}

/// A folder with the built-in model, its card and its calibration.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("odin-reload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    for file in [
        "cifar10_cnn.onnx",
        "cifar10_cnn.card.json",
        "cifar10_cnn.calibration.json",
    ] {
        std::fs::copy(Path::new(REPO).join("models").join(file), dir.join(file)).expect("copy");
    }
    dir
}

fn config(dir: &Path) -> ServeConfig {
    let mut config = ServeConfig {
        model: ModelSource::File {
            model: dir.join("cifar10_cnn.onnx"),
            card: Some(dir.join("cifar10_cnn.card.json")),
        },
        calibration: CalibrationSource::File(dir.join("cifar10_cnn.calibration.json")),
        ..ServeConfig::default()
    };
    config.engine.device = Device::Cpu;
    config
}

/// Writes the calibration with `threshold` instead of the shipped one.
fn set_threshold(dir: &Path, threshold: f64) {
    let path = dir.join("cifar10_cnn.calibration.json");
    let text = std::fs::read_to_string(&path).expect("read");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["threshold"] = threshold.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&json).expect("encode")).expect("write");
}

fn frame(i: usize) -> Frame {
    let pixels = (0..32 * 32 * 3)
        .map(|k| ((k * 7 + i * 13) % 251) as u8)
        .collect();
    Frame {
        frame_id: format!("f{i}"),
        image: Some(Image::Raw(RawImage {
            width: 32,
            height: 32,
            channels: 3,
            pixels,
        })),
        ..Frame::default()
    }
}

type Client = DetectorClient<tonic::transport::Channel>;

async fn client(server: &Server) -> Client {
    DetectorClient::connect(server.addr.clone())
        .await
        .expect("connects")
}

async fn info(client: &mut Client) -> odin_sidecar::wire::odin_v1::ModelInfo {
    client
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("info")
        .into_inner()
}

/// Streams `n` frames, one every `gap`, and collects every verdict; the
/// stream must end OK.
async fn paced_stream(addr: String, n: usize, gap: Duration) -> Vec<Verdict> {
    let mut client = DetectorClient::connect(addr).await.expect("connects");
    let frames = tokio_stream::iter(0..n).then(move |i| async move {
        tokio::time::sleep(gap).await;
        frame(i)
    });
    let mut answers = client.detect(frames).await.expect("starts").into_inner();
    let mut verdicts = Vec::new();
    while let Some(v) = answers.next().await {
        verdicts.push(v.expect("a verdict, not an error status"));
    }
    verdicts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_calibration_takes_over_mid_stream_and_no_frame_is_lost() {
    let dir = workdir("calibration");
    let server = serve(config(&dir)).await;
    let mut client = client(&server).await;
    let before = info(&mut client).await;
    let old_threshold = before.scoring.as_ref().expect("scoring").threshold;

    let stream = tokio::spawn(paced_stream(
        server.addr.clone(),
        120,
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // A threshold no real score reaches: every frame after the switch is out.
    set_threshold(&dir, 2.0);
    // The file watcher may have been first; then this reload finds nothing new.
    let reloaded = server.reloader.reload().await.expect("reloads");
    let new_version = match reloaded {
        Reloaded::Calibration(versions) => versions.calibration.to_string(),
        Reloaded::Unchanged => {
            client
                .get_model_info(GetModelInfoRequest {})
                .await
                .expect("info")
                .into_inner()
                .scoring
                .expect("scoring")
                .calibration_version
        }
        Reloaded::Model(_) => panic!("the model did not change"),
    };
    assert_ne!(
        new_version,
        before
            .scoring
            .as_ref()
            .expect("scoring")
            .calibration_version
    );
    let verdicts = stream.await.expect("stream task");

    assert_eq!(verdicts.len(), 120, "every frame answered once");
    for (i, v) in verdicts.iter().enumerate() {
        assert_eq!(v.frame_id, format!("f{i}"), "in order");
        assert!(v.error.is_none(), "{:?}", v.error);
    }
    let old: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| {
            v.calibration_version == before.scoring.as_ref().expect("s").calibration_version
        })
        .collect();
    let new: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| v.calibration_version == new_version)
        .collect();
    assert_eq!(
        old.len() + new.len(),
        120,
        "each verdict names one of the two"
    );
    assert!(
        !old.is_empty() && !new.is_empty(),
        "{} old, {} new",
        old.len(),
        new.len()
    );
    // Once switched, every later frame uses the new version.
    let first_new = verdicts
        .iter()
        .position(|v| v.calibration_version == new_version)
        .expect("a new verdict");
    assert!(verdicts[first_new..]
        .iter()
        .all(|v| v.calibration_version == new_version));
    assert!(old.iter().all(|v| v.threshold == old_threshold));
    assert!(new.iter().all(|v| v.threshold == 2.0 && !v.in_distribution));

    let after = info(&mut client).await;
    let scoring = after.scoring.expect("scoring");
    assert_eq!(scoring.threshold, 2.0);
    assert_eq!(scoring.calibration_version, new_version);
    assert_eq!(after.revision, before.revision, "same model");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_refused_and_the_old_version_serves_on() {
    let dir = workdir("broken");
    let server = serve(config(&dir)).await;
    let mut client = client(&server).await;
    let before = info(&mut client).await;
    std::fs::write(dir.join("cifar10_cnn.calibration.json"), b"{ not json").expect("write");
    let refused = server.reloader.reload().await;
    assert!(refused.is_err(), "{refused:?}");
    // A broken model file too.
    std::fs::write(dir.join("cifar10_cnn.onnx"), b"not an onnx model").expect("write");
    restore_calibration(&dir);
    assert!(server.reloader.reload().await.is_err());
    assert_eq!(info(&mut client).await, before, "nothing changed");
    let verdict = client
        .detect_one(frame(0))
        .await
        .expect("serves")
        .into_inner();
    assert!(verdict.error.is_none());
    assert_eq!(verdict.model_revision, before.revision);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Restores a valid calibration file (so only the model file is broken).
fn restore_calibration(dir: &Path) {
    std::fs::copy(
        Path::new(REPO).join("models/cifar10_cnn.calibration.json"),
        dir.join("cifar10_cnn.calibration.json"),
    )
    .expect("copy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_file_is_watched_loaded_beside_the_old_and_takes_over() {
    let dir = workdir("model");
    let server = serve(config(&dir)).await;
    let mut client = client(&server).await;
    let before = info(&mut client).await;
    let stream = tokio::spawn(paced_stream(
        server.addr.clone(),
        150,
        Duration::from_millis(20),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The same network under another name: a different file, equal answers.
    let path = dir.join("cifar10_cnn.onnx");
    let mut model =
        odin_sidecar::onnx::ModelProto::decode(std::fs::read(&path).expect("read").as_slice())
            .expect("onnx");
    model.doc_string = Some("reloaded copy".into());
    std::fs::write(&path, model.encode_to_vec()).expect("write");
    // No explicit reload: the file watcher notices within a few seconds.
    let revision = loop {
        let now = info(&mut client).await;
        if now.revision != before.revision {
            break now.revision;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let verdicts = stream.await.expect("stream task");
    assert_eq!(verdicts.len(), 150, "no frame lost across the model switch");
    assert!(verdicts.iter().all(|v| v.error.is_none()));
    let revisions: std::collections::BTreeSet<&str> =
        verdicts.iter().map(|v| v.model_revision.as_str()).collect();
    assert!(
        revisions.contains(before.revision.as_str()) && revisions.contains(revision.as_str()),
        "{revisions:?}"
    );
    // Equal networks: the first frame, judged by the old version in the
    // stream, gets the same answer from the new one.
    let old = verdicts
        .iter()
        .find(|v| v.frame_id == "f0")
        .expect("first frame");
    assert_eq!(old.model_revision, before.revision);
    let new = client
        .detect_one(frame(0))
        .await
        .expect("serves")
        .into_inner();
    assert_eq!(new.model_revision, revision);
    assert_eq!(
        (new.score, new.predicted_class),
        (old.score, old.predicted_class)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
