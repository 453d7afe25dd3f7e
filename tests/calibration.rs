//! `calibrate` on a small ID/OOD split, and the calibration file served back
//! with `serve --calibration`.

#[macro_use]
mod common;

use std::process::Command;

use clap::Parser;
use common::*;
use odin_sidecar::calib::calibrate::{epsilons, Calibration, TEMPERATURES};
use odin_sidecar::calib::metrics;
use odin_sidecar::cli::{Cli, Command as Sub};
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, GetModelInfoRequest, ScoringOverride};

const TUNE: usize = 100;

async fn scores(
    server: &TestServer,
    set: &odin_sidecar::dataset::RawSet,
    over: Option<ScoringOverride>,
) -> Vec<(f32, bool)> {
    let frames: Vec<Frame> = (0..TUNE)
        .map(|i| Frame {
            frame_id: i.to_string(),
            image: Some(Image::Raw(set.raw(i).into())),
            scoring: over.clone(),
            ..Frame::default()
        })
        .collect();
    let verdicts = detect_all(server.client().await, frames).await;
    assert!(verdicts.iter().all(|v| v.error.is_none()));
    verdicts
        .iter()
        .map(|v| (v.score, v.in_distribution))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibration_beats_the_baseline_on_its_split_and_round_trips_into_serve() {
    let dir = std::env::temp_dir().join(format!("odin-calibration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let file = dir.join("calibration.json");
    let model = require!("models/resnet20_cifar10.onnx");
    let card = repo_dir().join("models/resnet20_cifar10.card.json");
    let output = Command::new(env!("CARGO_BIN_EXE_odin-sidecar"))
        .args([
            "calibrate",
            "--device",
            "cpu",
            "--tune",
            &TUNE.to_string(),
            "--model",
        ])
        .arg(&model)
        .arg("--card")
        .arg(&card)
        .arg("--id")
        .arg(require!("cifar10_test.u8"))
        .arg("--ood")
        .arg(require!("tin_crop.u8"))
        .arg("-o")
        .arg(&file)
        .output()
        .expect("calibrate runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let calibration = Calibration::load(&file).expect("a valid calibration file");
    assert!(TEMPERATURES.contains(&calibration.temperature));
    assert!(epsilons().contains(&calibration.epsilon));
    assert_eq!(calibration.method, "odin");
    assert!(
        calibration.fit_on.in_distribution.contains("images 0..100"),
        "{:?}",
        calibration.fit_on
    );

    // Serve the file exactly as a user would: through the CLI's flags.
    let cli = Cli::try_parse_from([
        "odin-sidecar".into(),
        "serve".into(),
        "--device".into(),
        "cpu".into(),
        "--model".into(),
        model.display().to_string(),
        "--card".into(),
        card.display().to_string(),
        "--calibration".into(),
        file.display().to_string(),
    ])
    .expect("flags parse");
    let Sub::Serve(args) = cli.command else {
        panic!("serve")
    };
    let server = TestServer::start(args.model.config().expect("config")).await;
    let info = server
        .client()
        .await
        .get_model_info(GetModelInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let scoring = info.scoring.expect("scoring");
    assert_eq!(
        (
            scoring.method.as_str(),
            scoring.temperature,
            scoring.epsilon,
            scoring.threshold
        ),
        (
            "odin",
            calibration.temperature,
            calibration.epsilon,
            calibration.threshold
        )
    );
    assert_eq!(scoring.threshold_source, file.display().to_string());

    // On the tuning split, the calibrated detector keeps ≥ 95% of ID frames
    // and lets through no more OOD frames than plain max-softmax at its own
    // 95%-TPR threshold.
    let (id, ood) = (require!(cifar10_test()), require!(tin_crop()));
    let calibrated_id = scores(&server, &id, None).await;
    let calibrated_ood = scores(&server, &ood, None).await;
    let kept = calibrated_id.iter().filter(|(_, keep)| *keep).count();
    assert!(kept as f64 >= 0.95 * TUNE as f64, "kept {kept} of {TUNE}");
    let msp = Some(ScoringOverride {
        method: "msp".into(),
        temperature: Some(1.0),
        ..Default::default()
    });
    let baseline_id = scores(&server, &id, msp.clone()).await;
    let baseline_ood = scores(&server, &ood, msp).await;
    let fpr = |id: &[(f32, bool)], ood: &[(f32, bool)]| {
        let s = |v: &[(f32, bool)]| v.iter().map(|(s, _)| *s).collect::<Vec<f32>>();
        metrics::evaluate(&s(id), &s(ood), 0.95).fpr_at_tpr
    };
    let (calibrated, baseline) = (
        fpr(&calibrated_id, &calibrated_ood),
        fpr(&baseline_id, &baseline_ood),
    );
    assert!(
        calibrated <= baseline,
        "calibrated FPR95 {calibrated} > baseline {baseline}"
    );
    let reported = calibration.metrics.expect("metrics").fpr_at_tpr;
    assert!(
        (reported - calibrated).abs() < 0.02,
        "file says {reported}, served {calibrated}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
