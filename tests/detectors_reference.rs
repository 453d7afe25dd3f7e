//! Every scoring method, served over gRPC per frame (and a calibrated
//! combination per server), against an independent NumPy / ONNX Runtime
//! implementation of its definition (`scripts/reference/detectors_real.py`)
//! on real images, to 1e-5 relative.
//!
//! The statistics are fitted here by the library's `fit` path on 2,000
//! CIFAR-10 training images (every 25th of the packed JPEG set) — clean,
//! and perturbed at T = 100, ε = 0.0032 — and the reference fits its own
//! from the same decoded pixels. Test frames: 64 CIFAR-10 test images, 64
//! TinyImageNet crops, 32 resizes and 32 uniform-noise images.
//!
//! Needs a Python with numpy, onnx and onnxruntime: `$ODIN_REF_PYTHON`, or
//! `.venv-ref/bin/python` (`scripts/setup.sh --ref`); without one the test
//! says so and skips (logged for `scripts/test.sh`).

#[macro_use]
mod common;

use std::path::{Path, PathBuf};

use common::{cifar10_test, data_dir, repo_dir, resnet20, tin_crop, TestServer};
use odin_sidecar::app::Offline;
use odin_sidecar::calib::sets::SplitMix64;
use odin_sidecar::dataset::RawSet;
use odin_sidecar::fit::train::{self, FitJob, TrainSet};
use odin_sidecar::fit::{FitConfig, StatsModel};
use odin_sidecar::score::Perturbation;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, RawImage, ScoringOverride};
use serde_json::{json, Value};

const FIT_T: f32 = 100.0;
const FIT_EPS: f32 = 0.0032;

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("ODIN_REF_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join(".venv-ref/bin/python"));
    let ok = std::process::Command::new(&candidate)
        .args(["-c", "import numpy, onnx, onnxruntime"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(candidate)
}

fn skip(why: &str) {
    let line = format!("detectors_reference: skipped: {why}");
    println!("{line}");
    if let Some(dir) = std::env::var_os("ODIN_SKIP_LOG") {
        let _ = std::fs::write(Path::new(&dir).join("detectors_reference"), line + "\n");
    }
}

/// One method as the frame asks for it and as the reference computes it.
struct Case {
    label: String,
    method: String,
    temperature: f32,
    epsilon: f32,
    reference: Value,
}

fn case(label: &str, method: &str, t: f32, e: f32, reference: Value) -> Case {
    Case {
        label: label.into(),
        method: method.into(),
        temperature: t,
        epsilon: e,
        reference,
    }
}

fn cases() -> Vec<Case> {
    let clean = |m: &str, params: Value| json!({"method": m, "params": params, "stats": "clean"});
    let at = |m: &str, params: Value, t: f32, e: f32, stats: &str| json!({"method": m, "params": params, "perturb": [t, e], "temperature": t, "stats": stats});
    let (t, e) = (FIT_T, FIT_EPS);
    vec![
        case("msp", "msp", 1.0, 0.0, clean("msp", json!({}))),
        case(
            "msp T=10",
            "msp",
            10.0,
            0.0,
            json!({"method": "msp", "temperature": 10.0}),
        ),
        case("energy", "energy", 1.0, 0.0, clean("energy", json!({}))),
        case(
            "maxlogit",
            "maxlogit",
            1.0,
            0.0,
            clean("maxlogit", json!({})),
        ),
        case(
            "gen",
            "gen",
            1.0,
            0.0,
            clean("gen", json!({"gamma": 0.1, "M": 100})),
        ),
        case(
            "gen(gamma=0.5,M=3)",
            "gen(gamma=0.5,M=3)",
            1.0,
            0.0,
            clean("gen", json!({"gamma": 0.5, "M": 3})),
        ),
        case(
            "knn(k=1)",
            "knn(k=1)",
            1.0,
            0.0,
            clean("knn", json!({"k": 1})),
        ),
        case(
            "knn(k=10)",
            "knn(k=10)",
            1.0,
            0.0,
            clean("knn", json!({"k": 10})),
        ),
        case("knn", "knn", 1.0, 0.0, clean("knn", json!({"k": 50}))),
        case("vim", "vim", 1.0, 0.0, clean("vim", json!({"dim": 32}))),
        case(
            "vim(dim=16)",
            "vim(dim=16)",
            1.0,
            0.0,
            clean("vim", json!({"dim": 16})),
        ),
        case("mds", "mds", 1.0, 0.0, clean("mds", json!({}))),
        case("rmds", "rmds", 1.0, 0.0, clean("rmds", json!({}))),
        case(
            "react",
            "react",
            1.0,
            0.0,
            clean("react", json!({"p": 90.0})),
        ),
        case(
            "react(p=99)",
            "react(p=99)",
            1.0,
            0.0,
            clean("react", json!({"p": 99.0})),
        ),
        case("fdbd", "fdbd", 1.0, 0.0, clean("fdbd", json!({}))),
        // On the perturbed frames; statistics fitted on perturbed training
        // features at this (T, ε) exist, so the feature detectors use them.
        case("odin", "odin", t, e, at("odin", json!({}), t, e, "clean")),
        case(
            "energy perturbed",
            "energy",
            t,
            e,
            at("energy", json!({}), t, e, "clean"),
        ),
        case(
            "gen perturbed",
            "gen",
            t,
            e,
            at("gen", json!({"gamma": 0.1, "M": 100}), t, e, "clean"),
        ),
        case(
            "knn(k=10) perturbed",
            "knn(k=10)",
            t,
            e,
            at("knn", json!({"k": 10}), t, e, "perturbed"),
        ),
        case(
            "vim perturbed",
            "vim",
            t,
            e,
            at("vim", json!({"dim": 32}), t, e, "perturbed"),
        ),
        case(
            "mds perturbed",
            "mds",
            t,
            e,
            at("mds", json!({}), t, e, "perturbed"),
        ),
        case(
            "rmds perturbed",
            "rmds",
            t,
            e,
            at("rmds", json!({}), t, e, "perturbed"),
        ),
        case(
            "react perturbed",
            "react",
            t,
            e,
            at("react", json!({"p": 90.0}), t, e, "perturbed"),
        ),
        case(
            "fdbd perturbed",
            "fdbd",
            t,
            e,
            at("fdbd", json!({}), t, e, "perturbed"),
        ),
        // Another (T, ε): no statistics fitted there, the clean ones serve.
        case(
            "odin T=1000",
            "odin",
            1000.0,
            0.0014,
            at("odin", json!({}), 1000.0, 0.0014, "clean"),
        ),
        case(
            "knn(k=10) at T=1000",
            "knn(k=10)",
            1000.0,
            0.0014,
            at("knn", json!({"k": 10}), 1000.0, 0.0014, "clean"),
        ),
        case(
            "vim at T=1000",
            "vim",
            1000.0,
            0.0014,
            at("vim", json!({"dim": 32}), 1000.0, 0.0014, "clean"),
        ),
    ]
}

/// The combination the second server is calibrated with.
const PARTS: [(&str, f32, f64, f64, f64); 2] = [
    // (method, temperature, weight, mean, std)
    ("odin", FIT_T, 0.7, 0.45, 0.2),
    ("knn(k=10)", 1.0, 0.3, -0.35, 0.12),
];

fn raw_frame(id: String, pixels: &[u8], over: Option<ScoringOverride>) -> Frame {
    Frame {
        frame_id: id,
        image: Some(Image::Raw(RawImage {
            width: 32,
            height: 32,
            channels: 3,
            pixels: pixels.to_vec(),
        })),
        scoring: over,
        ..Frame::default()
    }
}

fn write_raw(path: &Path, pixels: &[u8], n: usize) {
    std::fs::write(path, pixels).unwrap();
    std::fs::write(
        path.with_extension("json"),
        json!({"n": n, "h": 32, "w": 32, "c": 3}).to_string(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_matches_the_numpy_reference_on_real_images() {
    let config = require!(resnet20());
    let train_pack = require!("cifar10_train.jpgpack");
    let (cifar, crop) = (require!(cifar10_test()), require!(tin_crop()));
    let resize = RawSet::open(&require!("tin_resize.u8")).unwrap();
    let Some(python) = python() else {
        skip("no Python with numpy, onnx and onnxruntime (set ODIN_REF_PYTHON or run scripts/setup.sh --ref)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("odin-detectors-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Fit, clean and perturbed, on the same 2,000 training images.
    let offline = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Offline::load(&config).expect("model loads")
    })
    .await
    .unwrap();
    let Offline {
        model,
        graphs,
        mut engine,
        preprocessor,
    } = offline;
    let taps = graphs.taps.clone().expect("ResNet-20 is tapped");
    let set = TrainSet::open(&train_pack, &model.card.labels).expect("packed training set");
    let indices = train::spread(set.len(), Some(2000));
    let model_sha = odin_sidecar::model::sha256_hex(&model.onnx);
    let mut train_pixels = Vec::new();
    let mut train_labels = Vec::new();
    let mut paths = Vec::new();
    for perturbation in [
        None,
        Some(Perturbation {
            temperature: FIT_T,
            epsilon: FIT_EPS,
        }),
    ] {
        let job = FitJob {
            config: FitConfig::new(taps.classes, taps.dim),
            model: StatsModel {
                name: model.card.name.clone(),
                sha256: model_sha.clone(),
                feature_tensor: taps.features.clone(),
            },
            fc_weight: taps.fc_weight.clone(),
            fc_bias: taps.fc_bias.clone(),
            perturbation,
            batch: 128,
        };
        let first = perturbation.is_none();
        let (stats, report) = train::fit(
            &mut engine,
            &preprocessor,
            &set,
            &indices,
            job,
            |_| {},
            |_, px, label| {
                if first {
                    train_pixels.extend_from_slice(&px.pixels);
                    train_labels.push(label as u8);
                }
            },
        )
        .expect("fits");
        assert_eq!(report.n_train, 2000);
        assert!(report.max_logit_error < 1e-5, "{report:?}");
        let path = dir.join(if first {
            "clean.fit.safetensors"
        } else {
            "perturbed.fit.safetensors"
        });
        stats.save(&path).unwrap();
        paths.push(path);
    }
    write_raw(&dir.join("train.u8"), &train_pixels, 2000);
    std::fs::write(dir.join("train.labels.u8"), &train_labels).unwrap();

    // Test images.
    let mut test = Vec::new();
    for i in 0..64 {
        test.extend_from_slice(cifar.pixels(i));
    }
    for i in 0..64 {
        test.extend_from_slice(crop.pixels(i));
    }
    for i in 0..32 {
        test.extend_from_slice(resize.pixels(i));
    }
    let mut rng = SplitMix64(5);
    for _ in 0..32 * 3072 {
        test.push((rng.uniform() * 255.0).round() as u8);
    }
    let n = test.len() / 3072;
    write_raw(&dir.join("test.u8"), &test, n);
    let g = odin_sidecar::grad::derive(
        &model.onnx,
        &odin_sidecar::grad::GradOptions {
            std: model.card.input.std.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(dir.join("g.onnx"), &g.bytes).unwrap();

    // Served: server 1 with both statistics files, every method per frame.
    let mut served_config = config.clone();
    served_config.fit_stats = paths.clone();
    served_config.workers = 1;
    let server = TestServer::start(served_config).await;
    let info = &server.app_info.scoring;
    assert_eq!(info.feature_dim, 64);
    assert_eq!(info.fit_stats.len(), 2, "{:?}", info.fit_stats);
    let cases = cases();
    let mut frames = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        for i in 0..n {
            frames.push(raw_frame(
                format!("{c}/{i}"),
                &test[i * 3072..(i + 1) * 3072],
                Some(ScoringOverride {
                    method: case.method.clone(),
                    temperature: Some(case.temperature),
                    epsilon: Some(case.epsilon),
                    threshold: None,
                }),
            ));
        }
    }
    let verdicts = common::detect_all(server.client().await, frames).await;
    let mut served: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for v in &verdicts {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        let c: usize = v.frame_id.split('/').next().unwrap().parse().unwrap();
        served[c].push(f64::from(v.score));
        assert_eq!(
            v.method,
            cases[c]
                .method
                .parse::<odin_sidecar::score::Method>()
                .unwrap()
                .to_string()
        );
    }
    drop(server);

    // Server 2: a calibration file with a combination, as calibrate --auto writes it.
    let sha = odin_sidecar::model::sha256_hex(&std::fs::read(&paths[1]).unwrap());
    let calibration = json!({
        "method": "combined", "temperature": FIT_T, "epsilon": FIT_EPS, "threshold": 0.0,
        "tpr": 0.95, "model": "resnet20_cifar10",
        "fit_on": {"in_distribution": "test", "out_of_distribution": []},
        "metrics": null, "selection": "tests/detectors_reference.rs",
        "fit_stats": [{"file": "perturbed.fit.safetensors", "sha256": sha,
                       "perturbation": {"temperature": FIT_T, "epsilon": FIT_EPS}}],
        "combination": {"parts": PARTS.iter().map(|(m, t, w, mean, std)| json!({
            "method": m, "temperature": t, "perturbed": true, "weight": w,
            "mean": mean, "std": std, "stats": if *m == "odin" { Value::Null } else { json!(0) },
        })).collect::<Vec<_>>()},
    });
    let cal_path = dir.join("combined.calibration.json");
    std::fs::write(&cal_path, calibration.to_string()).unwrap();
    let mut combined_config = config.clone();
    combined_config.calibration = odin_sidecar::config::CalibrationSource::File(cal_path);
    combined_config.apply_calibration().unwrap();
    let server = TestServer::start(combined_config).await;
    assert_eq!(server.app_info.scoring.method, "combined");
    assert!(
        server
            .app_info
            .scoring
            .detector
            .contains("0.7·z(odin T=100, perturbed)"),
        "{}",
        server.app_info.scoring.detector
    );
    let frames = (0..n)
        .map(|i| raw_frame(format!("c{i}"), &test[i * 3072..(i + 1) * 3072], None))
        .collect();
    let verdicts = common::detect_all(server.client().await, frames).await;
    let combined: Vec<f64> = verdicts
        .iter()
        .map(|v| {
            assert!(v.error.is_none(), "{:?}", v.error);
            f64::from(v.score)
        })
        .collect();
    drop(server);

    // The reference.
    let mut methods: Vec<Value> = cases
        .iter()
        .map(|c| {
            let mut r = c.reference.clone();
            r["label"] = json!(c.label);
            r
        })
        .collect();
    methods.push(json!({
        "label": "combined", "method": "combined",
        "parts": PARTS.iter().map(|(m, t, w, mean, std)| {
            let (name, params) = match *m {
                "odin" => ("odin", json!({})),
                _ => ("knn", json!({"k": 10})),
            };
            json!({"method": name, "params": params, "perturb": [FIT_T, FIT_EPS],
                   "temperature": t, "stats": "perturbed", "weight": w, "mean": mean, "std": std})
        }).collect::<Vec<_>>(),
    }));
    let job = json!({
        "model": data_dir().join("models/resnet20_cifar10.onnx"),
        "gradient_graph": dir.join("g.onnx"),
        "mean": model.card.input.mean, "std": model.card.input.std,
        "train": {"pixels": dir.join("train.u8"), "labels": dir.join("train.labels.u8"),
                  "n": 2000, "h": 32, "w": 32, "c": 3},
        "test": {"pixels": dir.join("test.u8"), "n": n, "h": 32, "w": 32, "c": 3},
        "fit_perturbation": [FIT_T, FIT_EPS],
        "methods": methods,
    });
    std::fs::write(dir.join("job.json"), job.to_string()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(repo_dir().join("scripts/reference/detectors_real.py"))
        .arg(dir.join("job.json"))
        .arg(dir.join("reference.json"))
        .output()
        .expect("runs python");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();

    // Compare: 1e-5 relative on every frame (relative to the score, or to
    // 1e-3 of the largest |score| of the method for scores near zero).
    println!(
        "\n{:<24} {:>14} {:>14}",
        "method", "max rel. err", "max |Δ|/scale"
    );
    let mut failures = Vec::new();
    let all = cases
        .iter()
        .map(|c| c.label.clone())
        .zip(served)
        .chain(std::iter::once(("combined".to_string(), combined)));
    for (label, got) in all {
        let want: Vec<f64> = reference[&label]
            .as_array()
            .unwrap_or_else(|| panic!("reference has no {label}"))
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len(), "{label}");
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let (mut rel, mut scaled) = (0.0f64, 0.0f64);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let d = (g - w).abs();
            let r = d / w.abs().max(1e-3 * scale);
            rel = rel.max(r);
            scaled = scaled.max(d / scale);
            if r > 1e-5 {
                failures.push(format!("{label}: frame {i}: served {g} vs reference {w}"));
            }
        }
        println!("{label:<24} {rel:>14.2e} {scaled:>14.2e}");
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(failures.is_empty(), "{failures:#?}");
}
