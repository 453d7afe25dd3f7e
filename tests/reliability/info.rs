//! GetModelInfo names a calibration file by its name and digest, never by
//! where it lies on the server.

use std::time::Duration;

use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;
use odin_sidecar::wire::odin_v1::GetModelInfoRequest;

use crate::harness::*;

async fn threshold_source(args: &[&str]) -> String {
    let mut all = vec!["--addr", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let mut proc = Proc::serve(&all);
    let mut client = DetectorClient::new(connect(proc.addr().await).await);
    let info = client
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("GetModelInfo")
        .into_inner();
    proc.signal("TERM");
    proc.exit(Duration::from_secs(20)).await.expect("exits");
    info.scoring.expect("scoring").threshold_source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threshold_source_is_the_calibration_files_name_and_digest_never_its_directory() {
    let dir = TempDir::new("calib");
    let path = dir.join("calib.json");
    let bytes = std::fs::read(repo().join("models/cifar10_cnn.calibration.json"))
        .expect("the built-in calibration");
    std::fs::write(&path, &bytes).expect("write");
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();

    let calib = path.display().to_string();
    let source = threshold_source(&["--calibration", &calib]).await;
    println!("--calibration {calib}: threshold_source {source:?}");
    // "calib.json (sha256 <the start of the file's SHA-256>…)".
    let shown = source
        .strip_prefix("calib.json (sha256 ")
        .and_then(|rest| rest.strip_suffix("…)"))
        .unwrap_or_else(|| panic!("{source:?} is not \"calib.json (sha256 …)\""));
    assert!(
        shown.len() >= 8 && hex.starts_with(shown),
        "{source:?}: {shown:?} is not the start of the file's SHA-256 {hex}"
    );
    let dir_name = dir.path().display().to_string();
    assert!(
        !source.contains(&dir_name),
        "{source:?} leaks the directory"
    );
    assert!(!source.contains('/'), "{source:?} holds a path");

    let source = threshold_source(&["--threshold", "0.3"]).await;
    assert_eq!(source, "flag");
    let source = threshold_source(&[]).await;
    println!("no scoring flags: threshold_source {source:?}");
    assert!(
        !source.contains(&repo().display().to_string()),
        "{source:?} leaks the server's file system"
    );
}
