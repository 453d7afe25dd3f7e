//! `calibrate` on a small ID/OOD split of the real data (ResNet-20,
//! CIFAR-10 against TinyImageNet crops), the calibration file served back
//! with `serve --calibration`, and the detector checked on held-out images.

#[macro_use]
mod common;

use std::process::Command;

use clap::Parser;
use common::*;
use odin_sidecar::calib::calibrate::{epsilons, Calibration, TEMPERATURES};
use odin_sidecar::cli::{Cli, Command as Sub};
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, GetModelInfoRequest, ScoringOverride};

/// Images per set the calibration is fit on (the first ones).
const TUNE: usize = 100;
/// Images per set after those, to check it on.
const HELD_OUT: usize = 300;

/// FPR at 95% TPR, computed here: the threshold is the score that keeps
/// 95% of the ID scores (rounded to keep at least that many), the FPR the
/// share of OOD scores at or above it.
fn fpr_at_95_tpr(id: &[(f32, bool)], ood: &[(f32, bool)]) -> f64 {
    let mut scores: Vec<f32> = id.iter().map(|(s, _)| *s).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    let keep = (0.95 * scores.len() as f64).ceil() as usize;
    let threshold = scores[keep - 1];
    ood.iter().filter(|(s, _)| *s >= threshold).count() as f64 / ood.len() as f64
}

/// Scores and verdicts of images `range` of `set`, served with `over`.
async fn scores(
    server: &TestServer,
    set: &odin_sidecar::dataset::RawSet,
    range: std::ops::Range<usize>,
    over: Option<ScoringOverride>,
) -> Vec<(f32, bool)> {
    let frames: Vec<Frame> = range
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
async fn calibration_round_trips_into_serve_and_beats_msp_on_held_out_images() {
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
    // The file's name and digest, never the server's path to it.
    assert!(
        scoring
            .threshold_source
            .starts_with("calibration.json (sha256 ")
            && !scoring
                .threshold_source
                .contains(&*file.display().to_string()),
        "{}",
        scoring.threshold_source
    );

    // What grid search chose is not the baseline it contains (T = 1, ε = 0).
    assert!(
        calibration.temperature > 1.0 && calibration.epsilon > 0.0,
        "calibration chose T = {}, ε = {}",
        calibration.temperature,
        calibration.epsilon
    );

    let (id, ood) = (require!(cifar10_test()), require!(tin_crop()));
    let msp = Some(ScoringOverride {
        method: "msp".into(),
        temperature: Some(1.0),
        ..Default::default()
    });
    // On its tuning split: the served threshold keeps ≥ 95% of ID frames,
    // and the FPR the file reports is the one served.
    let tuned_id = scores(&server, &id, 0..TUNE, None).await;
    let tuned_ood = scores(&server, &ood, 0..TUNE, None).await;
    let kept = tuned_id.iter().filter(|(_, keep)| *keep).count();
    assert!(kept as f64 >= 0.95 * TUNE as f64, "kept {kept} of {TUNE}");
    let reported = calibration.metrics.expect("metrics").fpr_at_tpr;
    let served = fpr_at_95_tpr(&tuned_id, &tuned_ood);
    assert!(
        (reported - served).abs() < 0.02,
        "file says {reported}, served {served}"
    );

    // On images it was not fit on, it still keeps most ID frames (a
    // threshold set on 100 images lands a few points off its 95%: 88% here)
    // and lets through far fewer OOD frames than plain max-softmax does at
    // its own 95%-TPR threshold.
    let held_out = TUNE..TUNE + HELD_OUT;
    let calibrated_id = scores(&server, &id, held_out.clone(), None).await;
    let calibrated_ood = scores(&server, &ood, held_out.clone(), None).await;
    let kept = calibrated_id.iter().filter(|(_, keep)| *keep).count();
    assert!(
        kept as f64 >= 0.85 * HELD_OUT as f64,
        "kept {kept} of {HELD_OUT} held-out ID frames"
    );
    let baseline_id = scores(&server, &id, held_out.clone(), msp.clone()).await;
    let baseline_ood = scores(&server, &ood, held_out, msp).await;
    let (calibrated, baseline) = (
        fpr_at_95_tpr(&calibrated_id, &calibrated_ood),
        fpr_at_95_tpr(&baseline_id, &baseline_ood),
    );
    assert!(
        calibrated + 0.20 <= baseline,
        "held out: calibrated FPR95 {calibrated:.3}, MSP {baseline:.3}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
