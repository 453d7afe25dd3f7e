//! The fused serving graph (G plus the model's forward pass on `perturbed`,
//! weights shared, plus the feature taps) gives what the two-session path
//! gives (G, then the model on G's `perturbed`) to 1e-6, on real images,
//! for the ResNet-20 (real data) and the built-in CNN (seeded synthetic
//! images, so it runs without the data); its clean outputs equal the plain
//! model's; and the CPU fallback of `--device auto` runs it.

#[macro_use]
mod common;

use common::{cifar10_test, normalize, synthetic32, tin_crop, MEAN, STD};
use odin_sidecar::app;
use odin_sidecar::config::ServeConfig;
use odin_sidecar::engine::{BatchOutput, Device, Engine};
use odin_sidecar::model::Model;
use odin_sidecar::score::Perturbation;

fn engines(config: &ServeConfig) -> (Model, Engine, Engine) {
    let model = Model::load(&config.model).expect("model");
    let mut fused_config = config.clone();
    fused_config.engine.fused = true;
    let fused_graphs = app::graphs(&model, &fused_config).expect("fused graphs");
    assert!(fused_graphs.fused && fused_graphs.taps.is_some());
    let fused = Engine::load(&model, Some(&fused_graphs), &fused_config.engine).expect("fused");
    let mut two_config = config.clone();
    two_config.engine.fused = false;
    let two_graphs = app::graphs(&model, &two_config).expect("two-session graphs");
    assert!(!two_graphs.fused);
    let two = Engine::load(&model, Some(&two_graphs), &two_config.engine).expect("two-session");
    assert!(fused.fused() && !two.fused());
    (model, fused, two)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn compare(fused: &BatchOutput, two: &BatchOutput, what: &str) -> f32 {
    let parts: [(&str, &[f32], &[f32]); 4] = [
        ("logits", &fused.logits, &two.logits),
        (
            "features",
            fused.features.as_deref().expect("fused features"),
            two.features.as_deref().expect("two-session features"),
        ),
        (
            "perturbed_logits",
            fused.perturbed_logits.as_deref().expect("fused"),
            two.perturbed_logits.as_deref().expect("two"),
        ),
        (
            "perturbed_features",
            fused.perturbed_features.as_deref().expect("fused"),
            two.perturbed_features.as_deref().expect("two"),
        ),
    ];
    let mut worst = 0.0f32;
    for (name, a, b) in parts {
        let d = max_abs_diff(a, b);
        println!("{what}: {name}: max |fused − two-session| = {d:.1e}");
        assert!(d <= 1e-6, "{what}: {name} differs by {d}");
        worst = worst.max(d);
    }
    worst
}

/// 64 images: 32 CIFAR-10 test images and 32 TinyImageNet crops; `None`
/// (a recorded skip) without the data.
fn batch() -> Option<Vec<f32>> {
    let (cifar, tin) = (cifar10_test()?, tin_crop()?);
    let mut input = Vec::new();
    for i in 0..32 {
        input.extend(normalize(cifar.pixels(i), &MEAN, &STD));
    }
    for i in 0..32 {
        input.extend(normalize(tin.pixels(i), &MEAN, &STD));
    }
    Some(input)
}

#[test]
fn fused_equals_two_sessions_on_resnet20() {
    let config = require!(common::resnet20());
    let input = require!(batch());
    let (_, mut fused, mut two) = engines(&config);
    let n = input.len() / (3 * 32 * 32);
    for (t, e) in [(1000.0, 0.0014), (10.0, 0.002), (100.0, 0.0032)] {
        let p = Some(Perturbation {
            temperature: t,
            epsilon: e,
        });
        let a = fused.run(&input, n, p).unwrap();
        let b = two.run(&input, n, p).unwrap();
        compare(&a, &b, &format!("ResNet-20 T={t} ε={e}"));
        // Batch 1 through the fused graph gives the same as in the batch.
        let one = fused.run(&input[..3 * 32 * 32], 1, p).unwrap();
        assert!(
            max_abs_diff(
                &one.perturbed_logits.unwrap(),
                &a.perturbed_logits.as_ref().unwrap()[..10]
            ) <= 1e-6
        );
    }
    // Clean outputs equal the plain model's forward pass, features included.
    let fused_run = fused
        .run(
            &input,
            n,
            Some(Perturbation {
                temperature: 1000.0,
                epsilon: 0.0014,
            }),
        )
        .unwrap();
    let (logits, features) = fused.forward(&input, n).unwrap();
    assert!(max_abs_diff(&logits, &fused_run.logits) <= 1e-6);
    let features = features.expect("tapped");
    assert_eq!(features.len(), n * 64);
    assert!(max_abs_diff(&features, fused_run.features.as_ref().unwrap()) <= 1e-6);
    // ε = 0 perturbs nothing: the perturbed outputs are the clean ones.
    let zero = fused
        .run(
            &input,
            n,
            Some(Perturbation {
                temperature: 1000.0,
                epsilon: 0.0,
            }),
        )
        .unwrap();
    assert!(max_abs_diff(zero.perturbed_logits.as_ref().unwrap(), &logits) <= 1e-6);
    assert!(max_abs_diff(zero.perturbed_features.as_ref().unwrap(), &features) <= 1e-6);
}

#[test]
fn fused_equals_two_sessions_on_the_built_in_model() {
    let mut config = ServeConfig::default();
    config.engine.device = Device::Cpu;
    let (model, mut fused, mut two) = engines(&config);
    let card = &model.card.input;
    let mut input = Vec::new();
    for i in 0..16 {
        input.extend(normalize(&synthetic32(i), &card.mean, &card.std));
    }
    let p = Some(Perturbation {
        temperature: 100.0,
        epsilon: 0.004,
    });
    let a = fused.run(&input, 16, p).unwrap();
    let b = two.run(&input, 16, p).unwrap();
    compare(&a, &b, "built-in CNN T=100 ε=0.004");
    assert_eq!(a.features.as_ref().unwrap().len(), 16 * 128);
}

/// `--device auto` on a machine without CUDA falls back to CPU and serves
/// the fused graph (the CUDA path itself needs a GPU: scripts/gpu-check.sh).
#[test]
fn auto_device_falls_back_to_cpu_with_the_fused_graph() {
    let mut config = require!(common::resnet20());
    let input = require!(batch());
    config.engine.device = Device::Auto;
    let model = Model::load(&config.model).unwrap();
    let graphs = app::graphs(&model, &config).unwrap();
    let mut engine = Engine::load(&model, Some(&graphs), &config.engine).unwrap();
    if engine.provider() != odin_sidecar::engine::Provider::Cpu {
        println!("CUDA is present here: {}", engine.provider());
    }
    let out = engine
        .run(
            &input[..4 * 3 * 32 * 32],
            4,
            Some(Perturbation {
                temperature: 1000.0,
                epsilon: 0.0014,
            }),
        )
        .unwrap();
    assert_eq!(out.perturbed_features.unwrap().len(), 4 * 64);
}
