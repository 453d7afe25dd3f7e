//! The feature-space detectors as a user serves them: `fit` and
//! `calibrate --auto` through the real binary, a server whose method is a
//! detector (GetModelInfo says so), per-frame overrides that name any
//! method, the errors of detectors a server cannot run (per frame and at
//! start-up), and a live reload onto another detector.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{cifar10_test, data_dir, repo_dir, resnet20, TestServer};
use odin_sidecar::app::{App, Reloaded};
use odin_sidecar::config::CalibrationSource;
use odin_sidecar::score::Method;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, ScoringOverride};

const BIN: &str = env!("CARGO_BIN_EXE_odin-sidecar");

fn resnet20_args() -> Vec<String> {
    vec![
        "--model".into(),
        data_dir()
            .join("models/resnet20_cifar10.onnx")
            .display()
            .to_string(),
        "--card".into(),
        repo_dir()
            .join("models/resnet20_cifar10.card.json")
            .display()
            .to_string(),
        "--device".into(),
        "cpu".into(),
    ]
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("odin-detectors-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `odin-sidecar fit` on 600 training images (bank of 500 rows).
fn fit(dir: &Path) -> PathBuf {
    let out = dir.join("resnet20.fit.safetensors");
    let run = Command::new(BIN)
        .arg("fit")
        .args(resnet20_args())
        .args(["--limit", "600", "--bank-rows", "500", "--train"])
        .arg(data_dir().join("cifar10_train.jpgpack"))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("runs fit");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("600 training images"), "{stderr}");
    assert!(stderr.contains("bank 500 rows (reservoir)"), "{stderr}");
    out
}

fn frame(id: &str, i: usize, method: &str, t: Option<f32>, e: Option<f32>) -> Frame {
    Frame {
        frame_id: id.into(),
        image: Some(Image::Raw(
            cifar10_test().expect("required by the test").raw(i).into(),
        )),
        scoring: Some(ScoringOverride {
            method: method.into(),
            temperature: t,
            epsilon: e,
            threshold: None,
        }),
        ..Frame::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_are_served_per_server_and_per_frame_with_clear_errors() {
    require!(resnet20());
    require!("cifar10_train.jpgpack");
    require!(cifar10_test());
    let dir = scratch("serving");
    let stats = fit(&dir);

    // A server whose own method is a detector.
    let mut config = resnet20().expect("required by the test");
    config.method = "knn(k=10)".parse().unwrap();
    config.fit_stats = vec![stats.clone()];
    config.threshold = -0.5;
    let server = TestServer::start(config).await;
    let scoring = &server.app_info.scoring;
    assert_eq!(scoring.method, "knn(k=10)");
    assert_eq!(scoring.detector, "knn(k=10)");
    assert_eq!(scoring.feature_dim, 64);
    assert_eq!(scoring.fit_stats.len(), 1);
    assert!(
        scoring.fit_stats[0].starts_with("resnet20.fit.safetensors (sha256 "),
        "{:?}",
        scoring.fit_stats
    );
    // Over gRPC too.
    let info = server
        .client()
        .await
        .get_model_info(odin_sidecar::wire::odin_v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let s = info.scoring.unwrap();
    assert_eq!((s.method.as_str(), s.feature_dim), ("knn(k=10)", 64));

    let frames = vec![
        // The server's own method.
        Frame {
            frame_id: "default".into(),
            image: Some(Image::Raw(
                cifar10_test().expect("required by the test").raw(0).into(),
            )),
            ..Frame::default()
        },
        frame("vim", 0, "vim(dim=16)", None, None),
        frame("mds", 0, "mds", None, None),
        frame("react", 0, "react(p=99)", None, None),
        frame("gen", 0, "gen(gamma=0.5,M=5)", None, None),
        frame("knn-perturbed", 0, "knn:k=5", Some(1000.0), Some(0.0014)),
        frame("fdbd", 0, "fdbd", None, None),
        // Errors: a k beyond the bank, an unfitted percentile, no combination.
        frame("k-too-large", 0, "knn(k=501)", None, None),
        frame("unfitted", 0, "react(p=42)", None, None),
        frame("no-combination", 0, "combined", None, None),
        frame("bad-k", 0, "knn(k=0)", None, None),
        frame("long", 0, "gen(gamma=0.1234567,M=1234567890)", None, None),
    ];
    let v = common::detect_all(server.client().await, frames).await;
    let by_id = |id: &str| v.iter().find(|v| v.frame_id == id).unwrap();
    let default = by_id("default");
    assert!(default.error.is_none(), "{:?}", default.error);
    assert_eq!(default.method, "knn(k=10)");
    assert!(
        default.score <= 0.0 && default.score >= -4.0,
        "{}",
        default.score
    );
    assert_eq!(default.in_distribution, default.score >= -0.5);
    for (id, method) in [
        ("vim", "vim(dim=16)"),
        ("mds", "mds"),
        ("react", "react(p=99)"),
        ("gen", "gen(gamma=0.5,M=5)"),
        ("knn-perturbed", "knn(k=5)"),
        ("fdbd", "fdbd"),
    ] {
        let v = by_id(id);
        assert!(v.error.is_none(), "{id}: {:?}", v.error);
        assert_eq!(v.method, method);
        assert!(v.score.is_finite());
    }
    assert!((by_id("knn-perturbed").epsilon - 0.0014).abs() < 1e-9);
    for (id, reason, words) in [
        ("k-too-large", "DETECTOR_UNAVAILABLE", "1..=500"),
        ("unfitted", "DETECTOR_UNAVAILABLE", "not fitted"),
        ("no-combination", "DETECTOR_UNAVAILABLE", "no combination"),
        ("bad-k", "UNKNOWN_METHOD", "\"knn(k=0)\""),
        ("long", "FIELD_TOO_LARGE", "scoring.method"),
    ] {
        let e = by_id(id)
            .error
            .as_ref()
            .unwrap_or_else(|| panic!("{id} got no error"));
        assert_eq!(e.reason, reason, "{id}: {}", e.message);
        assert!(e.message.contains(words), "{id}: {}", e.message);
    }
    drop(server);

    // A server without statistics: feature detectors are refused per frame,
    // the logit methods served.
    let server = TestServer::start(resnet20().expect("required by the test")).await;
    assert_eq!(server.app_info.scoring.fit_stats.len(), 0);
    let v = common::detect_all(
        server.client().await,
        vec![
            frame("knn", 1, "knn", None, None),
            frame("gen", 1, "gen", None, None),
        ],
    )
    .await;
    let e = v[0].error.as_ref().expect("refused");
    assert_eq!(e.reason, "DETECTOR_UNAVAILABLE");
    assert!(e.message.contains("--fit-stats"), "{}", e.message);
    assert!(v[1].error.is_none());
    drop(server);

    // At start-up: a detector without statistics, statistics of another model.
    let mut config = resnet20().expect("required by the test");
    config.method = Method::Vim { dim: 0 };
    let e = App::build(&config).await.unwrap_err().to_string();
    assert!(e.contains("vim") && e.contains("--fit-stats"), "{e}");
    let mut config = odin_sidecar::config::ServeConfig::default();
    config.engine.device = odin_sidecar::engine::Device::Cpu;
    config.calibration = CalibrationSource::Flags;
    config.fit_stats = vec![stats.clone()];
    let e = App::build(&config).await.unwrap_err().to_string();
    assert!(e.contains("fitted for model \"resnet20_cifar10\""), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_auto_writes_a_detector_that_serve_loads_and_reloads() {
    require!(resnet20());
    require!("cifar10_train.jpgpack");
    require!("tin_crop.u8");
    require!(cifar10_test());
    let dir = scratch("auto");
    let stats = fit(&dir);
    let calibration = dir.join("auto.calibration.json");
    // A tiny search (16 tuning images per set), just to exercise the path.
    let run = Command::new(BIN)
        .args(["calibrate", "--auto"])
        .args(resnet20_args())
        .arg("--id")
        .arg(data_dir().join("cifar10_test.u8"))
        .arg("--ood")
        .arg(data_dir().join("tin_crop.u8"))
        .args(["--ood", "uniform:16:11", "--tune", "16", "--fit-stats"])
        .arg(&stats)
        .arg("-o")
        .arg(&calibration)
        .output()
        .expect("runs calibrate --auto");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&calibration).unwrap()).unwrap();
    assert!(written["leaderboard"].as_array().unwrap().len() >= 10);
    let method: Method = written["method"].as_str().unwrap().parse().unwrap();
    if method.needs_features() || method == Method::Combined {
        // Named by file name, beside the calibration, with its digest.
        let refs = written["fit_stats"].as_array().unwrap();
        assert!(!refs.is_empty());
        assert_eq!(refs[0]["file"], "resnet20.fit.safetensors");
    }

    // Served exactly as written.
    let mut config = resnet20().expect("required by the test");
    config.calibration = CalibrationSource::File(calibration.clone());
    config.apply_calibration().unwrap();
    let app = App::build(&config).await.expect("serves the calibration");
    let info = app.info();
    assert_eq!(info.scoring.method, written["method"].as_str().unwrap());
    assert!(info
        .scoring
        .threshold_source
        .starts_with("auto.calibration.json"));

    // A live reload onto another detector reuses the engines.
    let sha = odin_sidecar::model::sha256_hex(&std::fs::read(&stats).unwrap());
    let other = serde_json::json!({
        "method": "mds", "temperature": 1.0, "epsilon": 0.0, "threshold": -100.0,
        "tpr": 0.95, "model": "resnet20_cifar10",
        "fit_on": {"in_distribution": "x", "out_of_distribution": []},
        "metrics": null, "selection": "by hand",
        "fit_stats": [{"file": "resnet20.fit.safetensors", "sha256": sha}],
    });
    std::fs::write(&calibration, other.to_string()).unwrap();
    match app.reloader().reload().await.expect("reloads") {
        Reloaded::Calibration(_) => {}
        other => panic!("expected a calibration reload, got {other:?}"),
    }
    assert_eq!(app.info().scoring.method, "mds");
    // A calibration whose statistics changed since is refused; the old one serves on.
    let wrong = serde_json::json!({
        "method": "knn", "temperature": 1.0, "epsilon": 0.0, "threshold": -1.0,
        "tpr": 0.95, "model": "resnet20_cifar10",
        "fit_on": {"in_distribution": "x", "out_of_distribution": []},
        "metrics": null, "selection": "by hand",
        "fit_stats": [{"file": "resnet20.fit.safetensors", "sha256": "00".repeat(32)}],
    });
    std::fs::write(&calibration, wrong.to_string()).unwrap();
    let e = app.reloader().reload().await.unwrap_err().to_string();
    assert!(e.contains("SHA-256"), "{e}");
    assert_eq!(app.info().scoring.method, "mds");
    std::fs::remove_dir_all(&dir).ok();
}
