//! The real `odin-sidecar` binary as a user runs it: `detect`, `info`,
//! `serve` (TCP and Unix socket, HTTP probes, SIGTERM), `export-grad`, its
//! environment variables and its refusals. All on the built-in model and
//! files the tests write; the accuracy checks on real CIFAR-10 need the
//! data directory.

#[macro_use]
mod common;

use std::process::{Command, Output};

use common::*;
use odin_sidecar::wire::odin_v1::detector_client::DetectorClient;

fn run(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    configure(&mut command);
    command.output().expect("runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn info_json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", stderr(output));
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// The built-in model's calibration file, read here.
fn builtin_calibration() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("models/cifar10_cnn.calibration.json"))
            .expect("calibration"),
    )
    .expect("JSON")
}

#[test]
fn detect_prints_one_json_verdict_per_frame_and_a_summary() {
    let dir = TempDir::new("detect");
    let config = builtin();
    let mut reference = Reference::new(&config);
    // 30 images; labels: the model's own class for the first 15 of the 20
    // judged, another class for the next 5, so accuracy is 15/20.
    let logits: Vec<Vec<f32>> = (0..30u64)
        .map(|i| reference.logits(&synthetic32(i)))
        .collect();
    let labels: Vec<u8> = logits
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let class = argmax(z) as u8;
            if (15..20).contains(&i) {
                (class + 1) % 10
            } else {
                class
            }
        })
        .collect();
    let set = write_raw_set(dir.path(), "frames", 30, 0, Some(&labels));
    let set = set.display().to_string();
    let output = run(
        &["detect", "--json", "--limit", "20", "--device", "cpu", &set],
        |_| {},
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout.clone()).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 20, "--limit 20 of 30");
    // With no scoring flag the built-in model serves its calibration.
    let calibration = builtin_calibration();
    let threshold = calibration["threshold"].as_f64().expect("threshold");
    let mut kept = 0;
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["frame_id"], format!("{set}#{i}"));
        assert!(v["error"].is_null(), "{v}");
        assert_eq!(v["method"], calibration["method"]);
        let class = argmax(&logits[i]);
        assert_eq!(v["predicted_class"], class);
        assert_eq!(v["label"], reference.card.labels[class]);
        let max_softmax = v["max_softmax"].as_f64().expect("max_softmax");
        let want = reference_max_softmax(&logits[i], 1.0);
        assert!(
            (max_softmax - want).abs() < 1e-5,
            "frame {i}: {max_softmax} vs {want}"
        );
        let score = v["score"].as_f64().expect("score");
        let in_distribution = v["in_distribution"].as_bool().expect("bool");
        assert_eq!(
            in_distribution,
            score >= threshold as f32 as f64,
            "frame {i}"
        );
        kept += usize::from(in_distribution);
    }
    let stderr = stderr(&output);
    assert!(
        stderr.contains("20 frames in")
            && stderr.contains(&format!("{kept} in-distribution, 0 errors"))
            && stderr.contains("accuracy 0.7500 on 20 labelled"),
        "{stderr}"
    );
}

#[test]
fn detect_reports_a_bad_file_and_exits_non_zero() {
    let dir = TempDir::new("detect-bad");
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a JPEG").expect("write");
    let good = dir.join("good.png");
    std::fs::write(
        &good,
        encode(&synthetic32(1), 32, 32, image::ImageFormat::Png),
    )
    .expect("write");
    let output = run(
        &[
            "detect",
            "--device",
            "cpu",
            &good.display().to_string(),
            &bad.display().to_string(),
        ],
        |_| {},
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<&str> = stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].starts_with(&good.display().to_string()) && !rows[0].contains("error"));
    assert!(rows[1].contains("DECODE_FAILED"), "{stdout}");
    assert!(stderr(&output).contains("2 frames in") && stderr(&output).contains("1 errors"));
}

#[test]
fn info_describes_the_built_in_model() {
    let info = info_json(&run(&["info", "--device", "cpu"], |_| {}));
    assert_eq!(info["name"], "cifar10_cnn");
    assert_eq!(info["execution_provider"], "CPUExecutionProvider");
    assert_eq!(info["labels"].as_array().expect("labels").len(), 10);
    // With no scoring flags the built-in model serves its own calibration.
    let calibration = builtin_calibration();
    assert_eq!(info["scoring"]["method"], calibration["method"]);
    for field in ["temperature", "epsilon", "threshold"] {
        let (got, want) = (info["scoring"][field].as_f64(), calibration[field].as_f64());
        // Served values are f32: compare at f32 precision.
        assert_eq!(got.map(|v| v as f32), want.map(|v| v as f32), "{field}");
    }
    let info = info_json(&run(
        &["info", "--device", "cpu", "--method", "msp"],
        |_| {},
    ));
    assert_eq!(
        info["scoring"]["method"], "msp",
        "a scoring flag replaces the built-in calibration"
    );
    assert_eq!(info["scoring"]["threshold"], 0.5);
    assert_eq!(info["scoring"]["threshold_source"], "flag");
}

#[test]
fn odin_environment_variables_configure_what_is_served() {
    let dir = TempDir::new("env");
    let model = write_builtin_model(dir.path(), "envmodel", |card| card.name = "from_env".into());
    let card = dir.join("envmodel.card.json");
    let info = info_json(&run(&["info"], |c| {
        c.env("ODIN_MODEL", &model)
            .env("ODIN_CARD", &card)
            .env("ODIN_DEVICE", "cpu")
            .env("ODIN_METHOD", "energy")
            .env("ODIN_TEMPERATURE", "7")
            .env("ODIN_EPSILON", "0.002")
            .env("ODIN_THRESHOLD", "-3.5");
    }));
    assert_eq!(info["name"], "from_env");
    assert_eq!(info["execution_provider"], "CPUExecutionProvider");
    let scoring = &info["scoring"];
    assert_eq!(scoring["method"], "energy");
    assert_eq!(scoring["temperature"], 7.0);
    assert_eq!(scoring["epsilon"].as_f64().map(|e| e as f32), Some(0.002));
    assert_eq!(scoring["threshold"], -3.5);

    // ODIN_CALIBRATION: a calibration file sets all four.
    let calibration = dir.join("calibration.json");
    std::fs::write(&calibration, builtin_calibration().to_string()).expect("write");
    let info = info_json(&run(&["info", "--device", "cpu"], |c| {
        c.env("ODIN_CALIBRATION", &calibration);
    }));
    // Named by file name and digest, never by its path on the server.
    let digest = odin_sidecar::model::short_digest(&std::fs::read(&calibration).expect("read"));
    assert_eq!(
        info["scoring"]["threshold_source"],
        format!("calibration.json (sha256 {digest}…)")
    );
    assert_eq!(info["scoring"]["method"], builtin_calibration()["method"]);

    // Values a server cannot run with are refused as configuration errors.
    for (var, value, words) in [
        ("ODIN_WORKERS", "0", "workers"),
        ("ODIN_MAX_BATCH", "0", "max batch"),
        ("ODIN_MAX_QUEUE_DELAY_MS", "-1", "--max-queue-delay-ms"),
        ("ODIN_TEMPERATURE", "0", "temperature must be > 0"),
    ] {
        let output = run(&["info", "--device", "cpu"], |c| {
            c.env(var, value);
        });
        assert_eq!(
            output.status.code(),
            Some(64),
            "{var}={value}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(words),
            "{var}={value}: {}",
            stderr(&output)
        );
    }

    // ODIN_LOG_FORMAT=json: every log line is a JSON object.
    let output = run(&["info", "--device", "cpu"], |c| {
        c.env("ODIN_LOG_FORMAT", "json").env("RUST_LOG", "info");
    });
    let log = stderr(&output);
    assert!(!log.trim().is_empty());
    for line in log.lines() {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(line["level"].is_string(), "{line}");
    }
}

#[test]
fn a_negative_or_nan_epsilon_is_refused_as_a_configuration_error() {
    for epsilon in ["-0.001", "NaN", "inf"] {
        let output = run(
            &["info", "--device", "cpu", &format!("--epsilon={epsilon}")],
            |_| {},
        );
        assert_eq!(
            output.status.code(),
            Some(64),
            "ε = {epsilon}: {}",
            stderr(&output)
        );
        let message = stderr(&output);
        assert!(
            message.contains("invalid configuration") && message.contains("epsilon must be >= 0"),
            "ε = {epsilon}: {message}"
        );
        assert!(output.stdout.is_empty(), "nothing is served");
    }
    // ε = 0 is fine.
    info_json(&run(&["info", "--device", "cpu", "--epsilon", "0"], |_| {}));
}

#[test]
fn calibration_excludes_the_scoring_flags() {
    let dir = TempDir::new("calibration-flags");
    let calibration = dir.join("calibration.json");
    std::fs::write(&calibration, builtin_calibration().to_string()).expect("write");
    let calibration = calibration.display().to_string();
    for (flag, value) in [
        ("--method", "msp"),
        ("--temperature", "2"),
        ("--epsilon", "0.001"),
        ("--threshold", "0.3"),
    ] {
        let output = run(
            &["info", "--calibration", &calibration, flag, value],
            |_| {},
        );
        assert_eq!(output.status.code(), Some(2), "{flag}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(
            message.contains("cannot be used with") && message.contains(flag),
            "{flag}: {message}"
        );
    }
}

#[test]
fn a_model_without_a_card_is_refused_with_the_fix() {
    let dir = TempDir::new("no-card");
    let model = dir.join("model.onnx");
    std::fs::write(&model, odin_sidecar::model::DEFAULT_MODEL_ONNX).expect("write");
    let output = run(&["info", "--model", &model.display().to_string()], |_| {});
    assert!(!output.status.success());
    let stderr = stderr(&output);
    assert!(
        stderr.contains("no model card")
            && stderr.contains("--card")
            && stderr.contains("model.card.json"),
        "{stderr}"
    );
}

#[test]
fn export_grad_writes_the_gradient_graph_of_the_built_in_model() {
    let dir = TempDir::new("export-grad");
    // The card beside the model gives the std.
    let model = write_builtin_model(dir.path(), "cnn", |_| {});
    let out = dir.join("cnn.odin.onnx");
    let output = run(
        &[
            "export-grad",
            &model.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        |_| {},
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("check: ONNX Runtime ran it"), "{stdout}");
    assert!(
        stdout.contains(&format!("wrote {}", out.display())),
        "{stdout}"
    );
    // What it wrote is the graph the server derives: same inputs and outputs.
    let written = std::fs::read(&out).expect("written");
    let derived = odin_sidecar::grad::derive(
        odin_sidecar::model::DEFAULT_MODEL_ONNX,
        &odin_sidecar::grad::GradOptions {
            std: builtin_card().input.std,
            raw_gradient: false,
            ..Default::default()
        },
    )
    .expect("derives");
    assert_eq!(written, derived.bytes);

    // Without a card or --std it says what to pass.
    let bare = dir.join("bare.onnx");
    std::fs::write(&bare, odin_sidecar::model::DEFAULT_MODEL_ONNX).expect("write");
    let output = run(
        &[
            "export-grad",
            &bare.display().to_string(),
            "-o",
            &dir.join("x.onnx").display().to_string(),
        ],
        |_| {},
    );
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--std"), "{}", stderr(&output));
}

/// `serve` with no model serves the built-in CNN with its calibration,
/// answers health probes over HTTP, and drains on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_no_model_serves_the_built_in_classifier() {
    let serve = ServeProcess::start(
        &[
            "--addr",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        |_| {},
    )
    .await;
    let mut client = DetectorClient::new(serve.channel().await);
    let mut reference = Reference::new(&builtin());
    let calibration = builtin_calibration();
    for i in 0..20u64 {
        let v = client
            .detect_one(raw_frame(i.to_string(), i))
            .await
            .expect("verdict")
            .into_inner();
        let logits = reference.logits(&synthetic32(i));
        reference.assert_answer(&v, &logits);
        assert_eq!(v.method, calibration["method"].as_str().expect("method"));
        assert_eq!(
            v.threshold,
            calibration["threshold"].as_f64().expect("threshold") as f32
        );
    }

    // Probes on the HTTP port: up, ready, and nothing else.
    let http = serve.metrics_addr.clone().expect("HTTP address logged");
    let (status, body) = http_get(http.as_str(), "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(http.as_str(), "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _) = http_get(http.as_str(), "/metrics").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(http.as_str(), "/nope").await;
    assert_eq!(status, 404);

    let channel = serve.channel().await;
    terminate(serve, channel).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_listens_on_a_unix_socket() {
    let dir = TempDir::new("uds");
    let socket = dir.join("odin.sock");
    // A stale socket from an earlier run (nobody listening) does not stop it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());
    let serve = ServeProcess::start(
        &[
            "--uds",
            &socket.display().to_string(),
            "--device",
            "cpu",
            "--method",
            "msp",
        ],
        |_| {},
    )
    .await;
    assert!(serve.addr.is_none(), "no TCP address when serving a socket");
    let mut client = DetectorClient::new(unix_channel(&socket).await);
    let mut reference = Reference::new(&builtin());
    let v = client
        .detect_one(raw_frame("uds", 3))
        .await
        .expect("verdict over the socket")
        .into_inner();
    let logits = reference.logits(&synthetic32(3));
    reference.assert_answer(&v, &logits);
    assert_eq!(v.score, v.max_softmax, "msp at T = 1");
    terminate(serve, unix_channel(&socket).await).await;
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[test]
fn detect_on_real_cifar10_is_accurate() {
    let set = require!("cifar10_test.u8").display().to_string();
    let resnet = require!("models/resnet20_cifar10.onnx")
        .display()
        .to_string();
    let card = repo_dir()
        .join("models/resnet20_cifar10.card.json")
        .display()
        .to_string();
    // The built-in CNN (81.4% on the whole set) and ResNet-20 (81.0%), on
    // the first 500 images: trained classifiers, not stubs.
    for model in [
        vec![],
        vec!["--model", resnet.as_str(), "--card", card.as_str()],
    ] {
        let mut args = vec![
            "detect", "-q", "--limit", "500", "--device", "cpu", "--method", "msp",
        ];
        args.extend(model.iter().copied());
        args.push(&set);
        let output = run(&args, |_| {});
        assert!(output.status.success(), "{}", stderr(&output));
        let stderr = stderr(&output);
        let accuracy: f64 = stderr
            .split("accuracy ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no accuracy in {stderr}"));
        assert!(accuracy >= 0.75, "{model:?}: accuracy {accuracy}");
        assert!(output.stdout.is_empty(), "-q prints only the summary");
    }
}
