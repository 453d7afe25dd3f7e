//! The sidecar driven by an independent client: Python grpcio, which learns
//! the protocol through reflection. `scripts/setup.sh --tests` installs it
//! into `.venv-test/`. The server serves the built-in model; the frames
//! are generated (a raw set written to a temporary folder).

#[macro_use]
mod common;

use common::*;
use odin_sidecar::wire::odin_v1::Frame;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_the_same_verdicts_as_rust() {
    let python = repo_dir().join(".venv-test/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/setup.sh --tests` (make test does)",
        python.display()
    );
    let config = builtin();
    let server = TestServer::start(config.clone()).await;
    // Six generated images in the raw set format the client reads.
    let dir = TempDir::new("python-client");
    let images = write_raw_set(dir.path(), "frames", 6, 0, None);
    let output = tokio::process::Command::new(&python)
        .arg(repo_dir().join("tests/python/client.py"))
        .arg(server.addr.to_string())
        .arg(&images)
        .output()
        .await
        .expect("python runs");
    assert!(
        output.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");

    let methods = report["methods"].as_array().expect("methods");
    for m in ["Detect", "DetectOne", "GetModelInfo"] {
        assert!(
            methods.iter().any(|x| x == m),
            "{m} missing from {methods:?}"
        );
    }

    // The same frames through the Rust client give the same classes and scores.
    let mut reference = Reference::new(&config);
    let mut client = server.client().await;
    let mut answers = vec![report["detect_one"].clone()];
    answers.extend(report["detect"].as_array().expect("detect").iter().cloned());
    assert_eq!(answers.len(), 6);
    for (i, py) in answers.iter().enumerate() {
        assert_eq!(py["frame_id"], format!("py-{i}"));
        assert_eq!(py["error"], serde_json::Value::Null);
        assert_eq!(py["client"], "python");
        let rust = client
            .detect_one(Frame {
                frame_id: format!("rust-{i}"),
                image: Some(raw(32, 32, 3, synthetic32(i as u64))),
                ..Frame::default()
            })
            .await
            .expect("DetectOne")
            .into_inner();
        let logits = reference.logits(&synthetic32(i as u64));
        reference.assert_answer(&rust, &logits);
        assert_eq!(py["predicted_class"], rust.predicted_class);
        let score = py["max_softmax"].as_f64().expect("score");
        assert!(
            (score - f64::from(rust.max_softmax)).abs() < 1e-6,
            "{score} vs {}",
            rust.max_softmax
        );
    }
}
