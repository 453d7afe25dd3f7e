//! The real `odin-sidecar` binary: `detect`, `info` and `serve` as a user
//! runs them.

#[macro_use]
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use odin_sidecar::wire::odin_v1::{detector_client::DetectorClient, frame::Image, Frame};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_odin-sidecar");

fn resnet20_args() -> Option<Vec<String>> {
    Some(vec![
        "--model".into(),
        require("models/resnet20_cifar10.onnx")?
            .display()
            .to_string(),
        "--card".into(),
        repo_dir()
            .join("models/resnet20_cifar10.card.json")
            .display()
            .to_string(),
        "--device".into(),
        "cpu".into(),
    ])
}

#[test]
fn detect_prints_one_json_verdict_per_frame_and_a_summary() {
    let output = Command::new(BIN)
        .args(["detect", "--json", "--limit", "20"])
        .args(require!(resnet20_args()))
        .arg(require!("cifar10_test.u8"))
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 20);
    for (i, v) in lines.iter().enumerate() {
        assert!(v["frame_id"]
            .as_str()
            .expect("id")
            .ends_with(&format!("#{i}")));
        assert!(v["error"].is_null());
        assert!(v["max_softmax"].as_f64().expect("score") > 0.1);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("20 frames in") && stderr.contains("accuracy"),
        "{stderr}"
    );
}

#[test]
fn detect_reports_a_bad_file_and_exits_non_zero() {
    let dir = std::env::temp_dir().join(format!("odin-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a JPEG").expect("write");
    let output = Command::new(BIN)
        .arg("detect")
        .args(require!(resnet20_args()))
        .arg(&bad)
        .output()
        .expect("runs");
    assert_eq!(
        output.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("DECODE_FAILED"));
}

#[test]
fn info_describes_the_built_in_model() {
    let output = Command::new(BIN)
        .args(["info", "--device", "cpu"])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(info["name"], "cifar10_cnn");
    assert_eq!(info["execution_provider"], "CPUExecutionProvider");
    assert_eq!(info["labels"].as_array().expect("labels").len(), 10);
    // With no scoring flags the built-in model serves its own calibration.
    let calibration: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("models/cifar10_cnn.calibration.json"))
            .expect("calibration"),
    )
    .expect("JSON");
    assert_eq!(info["scoring"]["method"], calibration["method"]);
    for field in ["temperature", "epsilon", "threshold"] {
        let (got, want) = (info["scoring"][field].as_f64(), calibration[field].as_f64());
        // Served values are f32: compare at f32 precision.
        assert_eq!(got.map(|v| v as f32), want.map(|v| v as f32), "{field}");
    }
    let output = Command::new(BIN)
        .args(["info", "--device", "cpu", "--method", "msp"])
        .output()
        .expect("runs");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(
        info["scoring"]["method"], "msp",
        "a scoring flag replaces the built-in calibration"
    );
    assert_eq!(info["scoring"]["threshold"], 0.5);
}

#[test]
fn a_model_without_a_card_is_refused_with_the_fix() {
    let output = Command::new(BIN)
        .args(["info", "--model"])
        .arg(require!("models/resnet20_cifar10.onnx"))
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no model card") && stderr.contains("--card"),
        "{stderr}"
    );
}

/// `serve` with no model serves the built-in CNN; SIGTERM stops it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_model_serves_the_built_in_classifier() {
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--device", "cpu"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("reads") {
            if let Some(rest) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("serving"))
            {
                return rest.split_whitespace().next().map(str::to_string);
            }
        }
        None
    })
    .await
    .expect("serves within a minute")
    .expect("logs its address");

    let mut client = DetectorClient::connect(format!("http://{addr}"))
        .await
        .expect("connects");
    let cifar = require!(cifar10_test());
    let mut correct = 0;
    for i in 0..50 {
        let v = client
            .detect_one(Frame {
                frame_id: i.to_string(),
                image: Some(Image::Raw(cifar.raw(i).into())),
                ..Frame::default()
            })
            .await
            .expect("verdict")
            .into_inner();
        assert!(v.error.is_none());
        correct +=
            usize::from(Some(v.predicted_class as u8) == cifar.labels.as_ref().map(|l| l[i]));
    }
    // A trained classifier, not a stub: well above the 10% of chance.
    assert!(correct >= 25, "{correct}/50 correct");

    terminate(child).await;
}
