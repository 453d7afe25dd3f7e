//! CUDA: the fused serving graph and the two-session path on the CUDA
//! execution provider, against each other and against the CPU, and a server
//! on `--device cuda` scoring every method. Runs only with `ODIN_CUDA=1`
//! and an onnxruntime-gpu library (`scripts/gpu-check.sh` sets both up);
//! elsewhere each test says so and skips. The CPU fallback of
//! `--device auto` is tested in tests/fused_graph.rs and tests/e2e.rs.

#[macro_use]
mod common;

use std::path::Path;

use common::{cifar10_test, normalize, tin_crop, TestServer, MEAN, STD};
use odin_sidecar::app;
use odin_sidecar::engine::{Device, Engine, Provider};
use odin_sidecar::model::Model;
use odin_sidecar::score::Perturbation;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, ScoringOverride};

fn cuda_or_skip(test: &str) -> bool {
    if std::env::var("ODIN_CUDA").as_deref() == Ok("1") {
        return true;
    }
    let line = format!(
        "cuda::{test}: skipped: set ODIN_CUDA=1 on a machine with a GPU (scripts/gpu-check.sh)"
    );
    println!("{line}");
    if let Some(dir) = std::env::var_os("ODIN_SKIP_LOG") {
        let _ = std::fs::write(Path::new(&dir).join(format!("cuda-{test}")), line + "\n");
    }
    false
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn fused_and_two_session_agree_on_cuda_and_with_the_cpu() {
    if !cuda_or_skip("fused_and_two_session_agree_on_cuda_and_with_the_cpu") {
        return;
    }
    let mut config = require!(common::resnet20());
    let model = Model::load(&config.model).unwrap();
    let (cifar, crop) = (require!(cifar10_test()), require!(tin_crop()));
    let mut input = Vec::new();
    for i in 0..32 {
        input.extend(normalize(cifar.pixels(i), &MEAN, &STD));
        input.extend(normalize(crop.pixels(i), &MEAN, &STD));
    }
    let p = Some(Perturbation {
        temperature: 1000.0,
        epsilon: 0.0014,
    });
    let mut outputs = Vec::new();
    for (device, fused) in [
        (Device::Cuda(0), true),
        (Device::Cuda(0), false),
        (Device::Cpu, true),
    ] {
        config.engine.device = device;
        config.engine.fused = fused;
        let graphs = app::graphs(&model, &config).unwrap();
        let mut engine = Engine::load(&model, Some(&graphs), &config.engine).unwrap();
        if device != Device::Cpu {
            assert_eq!(engine.provider(), Provider::Cuda(0));
        }
        outputs.push(engine.run(&input, 64, p).unwrap());
    }
    let (fused, two, cpu) = (&outputs[0], &outputs[1], &outputs[2]);
    let d = |a: &Option<Vec<f32>>, b: &Option<Vec<f32>>| {
        max_abs_diff(a.as_deref().unwrap(), b.as_deref().unwrap())
    };
    println!(
        "CUDA fused vs two-session: logits {:.1e}, perturbed logits {:.1e}, features {:.1e}",
        max_abs_diff(&fused.logits, &two.logits),
        d(&fused.perturbed_logits, &two.perturbed_logits),
        d(&fused.features, &two.features)
    );
    println!(
        "CUDA fused vs CPU: logits {:.1e}, perturbed logits {:.1e}, perturbed features {:.1e}",
        max_abs_diff(&fused.logits, &cpu.logits),
        d(&fused.perturbed_logits, &cpu.perturbed_logits),
        d(&fused.perturbed_features, &cpu.perturbed_features)
    );
    // cuDNN may pick other algorithms per session: same math, other rounding.
    assert!(max_abs_diff(&fused.logits, &two.logits) <= 1e-4);
    assert!(d(&fused.perturbed_logits, &two.perturbed_logits) <= 1e-3);
    assert!(max_abs_diff(&fused.logits, &cpu.logits) <= 1e-3);
    assert!(d(&fused.features, &cpu.features) <= 1e-3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_cuda_scores_every_method() {
    if !cuda_or_skip("a_server_on_cuda_scores_every_method") {
        return;
    }
    let mut config = require!(common::resnet20());
    config.engine.device = Device::Cuda(0);
    let stats = common::repo_dir().join("results-work/resnet20.fit.safetensors");
    let has_stats = stats.exists();
    if has_stats {
        config.fit_stats = vec![stats];
    }
    let server = TestServer::start(config).await;
    assert!(server
        .app_info
        .execution_provider
        .starts_with("CUDAExecutionProvider"));
    let cifar = require!(cifar10_test());
    let mut methods = vec!["msp", "odin", "energy", "maxlogit", "gen"];
    if has_stats {
        methods.extend(["knn", "vim", "mds", "rmds", "react", "fdbd"]);
    }
    let frames = methods
        .iter()
        .enumerate()
        .flat_map(|(m, method)| (0..8).map(move |i| (m, i, *method)))
        .map(|(m, i, method)| Frame {
            frame_id: format!("{m}/{i}"),
            image: Some(Image::Raw(cifar.raw(i).into())),
            scoring: Some(ScoringOverride {
                method: method.into(),
                temperature: Some(1000.0),
                epsilon: Some(0.0014),
                threshold: None,
            }),
            ..Frame::default()
        })
        .collect();
    let verdicts = common::detect_all(server.client().await, frames).await;
    for v in verdicts {
        assert!(v.error.is_none(), "{}: {:?}", v.frame_id, v.error);
        assert!(v.score.is_finite(), "{}", v.frame_id);
    }
}
