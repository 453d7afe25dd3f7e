//! ODIN through the sidecar, over real gRPC, against the independent PyTorch
//! autograd reference in `shared/data/reference/resnet20/`: 1,280 images
//! (CIFAR-10, TinyImageNet crop/resize, uniform and gaussian noise).
//!
//! At T = 1000 every score sits near 1/K = 0.1 and the whole perturbation
//! moves it by only 1e-4 to 8e-4, so only a tolerance as tight as 2e-6
//! tells a right perturbation from none.

#[macro_use]
mod common;

use common::*;
use odin_sidecar::score::Method;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, RawImage, ScoringOverride, Verdict};

const SETS: [&str; 5] = ["cifar10", "tin_crop", "tin_resize", "uniform", "gaussian"];

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Reference {
    images: Vec<u8>,
    odin_1000: Vec<f32>,
    odin_10: Vec<f32>,
    msp: Vec<f32>,
    energy: Vec<f32>,
}

fn reference(set: &str) -> Reference {
    let dir = data_dir().join("reference/resnet20").join(set);
    Reference {
        images: std::fs::read(dir.join("images.u8")).expect("images.u8"),
        odin_1000: read_f32(&dir.join("odin_T1000_eps0.0014.f32")),
        odin_10: read_f32(&dir.join("odin_T10_eps0.002.f32")),
        msp: read_f32(&dir.join("odin_T1_eps0.f32")),
        energy: read_f32(&dir.join("energy_T1.f32")),
    }
}

/// Sends every image four times on one stream (one scoring each) and returns
/// the verdicts grouped by scoring: [odin 1000, odin 10, msp, energy].
async fn verdicts(server: &TestServer, images: &[u8]) -> [Vec<Verdict>; 4] {
    let overrides = [
        ScoringOverride::default(),
        ScoringOverride {
            temperature: Some(10.0),
            epsilon: Some(0.002),
            ..Default::default()
        },
        ScoringOverride {
            method: "msp".into(),
            temperature: Some(1.0),
            ..Default::default()
        },
        ScoringOverride {
            method: "energy".into(),
            temperature: Some(1.0),
            // The reference energy is of the unperturbed input.
            epsilon: Some(0.0),
            ..Default::default()
        },
    ];
    let mut frames = Vec::new();
    for (i, pixels) in images.chunks_exact(32 * 32 * 3).enumerate() {
        for (k, over) in overrides.iter().enumerate() {
            frames.push(Frame {
                frame_id: format!("{i}/{k}"),
                image: Some(Image::Raw(RawImage {
                    width: 32,
                    height: 32,
                    channels: 3,
                    pixels: pixels.to_vec(),
                })),
                scoring: Some(over.clone()),
                ..Frame::default()
            });
        }
    }
    let mut out: [Vec<Verdict>; 4] = Default::default();
    for (n, v) in detect_all(server.client().await, frames)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        out[n % 4].push(v);
    }
    out
}

/// Fraction of `got` within `tolerance(i)` of `want`, and the largest miss.
fn agreement(got: &[f32], want: &[f32], tolerance: impl Fn(f32) -> f32) -> (f64, f32) {
    assert_eq!(got.len(), want.len());
    let ok = got
        .iter()
        .zip(want)
        .filter(|(g, w)| (*g - *w).abs() <= tolerance(**w))
        .count();
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    (ok as f64 / got.len() as f64, worst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odin_msp_and_energy_scores_match_the_pytorch_reference() {
    let mut config = require!(resnet20());
    config.method = Method::Odin;
    config.temperature = 1000.0;
    config.epsilon = 0.0014;
    let server = TestServer::start(config).await;
    assert!(server.app_info.scoring.perturbation_available);

    for set in SETS {
        let reference = reference(set);
        let [odin_1000, odin_10, msp, energy] = verdicts(&server, &reference.images).await;
        let score = |v: &[Verdict]| v.iter().map(|v| v.score).collect::<Vec<f32>>();
        assert!(odin_1000
            .iter()
            .all(|v| v.method == "odin" && v.epsilon == 0.0014_f32));

        let (ok, worst) = agreement(&score(&odin_1000), &reference.odin_1000, |_| 2e-6);
        assert!(
            ok >= 0.99,
            "{set}: ODIN T=1000 within 2e-6 for {ok:.4} (worst {worst:e})"
        );
        let (ok, worst) = agreement(&score(&odin_10), &reference.odin_10, |_| 5e-4);
        assert!(
            ok >= 0.99,
            "{set}: ODIN T=10 within 5e-4 for {ok:.4} (worst {worst:e})"
        );
        let (ok, worst) = agreement(&score(&msp), &reference.msp, |_| 5e-6);
        assert!(
            ok >= 0.99,
            "{set}: MSP within 5e-6 for {ok:.4} (worst {worst:e})"
        );
        // The reference stores -logsumexp (lower = ID); verdicts negate it.
        let negated: Vec<f32> = reference.energy.iter().map(|e| -e).collect();
        let (ok, worst) = agreement(&score(&energy), &negated, |w| 1e-4 * w.abs());
        assert!(
            ok >= 0.99,
            "{set}: energy within 1e-4 relative for {ok:.4} (worst {worst:e})"
        );
        eprintln!(
            "{set}: ODIN T=1000 worst |Δ| {:e}",
            agreement(&score(&odin_1000), &reference.odin_1000, |_| 2e-6).1
        );
    }
}

/// With ε = 0 or the wrong sign the same tolerance fails: the test can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tolerance_tells_a_right_perturbation_from_none() {
    let mut config = require!(resnet20());
    config.method = Method::Odin;
    config.temperature = 1000.0;
    config.epsilon = 0.0;
    let server = TestServer::start(config).await;
    let reference = reference("cifar10");
    let [unperturbed, ..] = verdicts(&server, &reference.images).await;
    let scores: Vec<f32> = unperturbed.iter().map(|v| v.score).collect();
    let (ok, _) = agreement(&scores, &reference.odin_1000, |_| 2e-6);
    assert!(
        ok < 0.5,
        "without the perturbation {ok:.3} of scores still agree"
    );
}
