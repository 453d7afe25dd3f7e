//! The derived ResNet-20 ODIN graph against the independent PyTorch
//! reference (`shared/data/reference/resnet20/*`), and ResNet-56 against
//! central finite differences.

#[macro_use]
mod common;

use common::*;
use odin_sidecar::grad::{derive, GradOptions};

const T: f32 = 1000.0;
const EPS: f32 = 0.0014;
const SETS: [&str; 5] = ["cifar10", "tin_crop", "tin_resize", "uniform", "gaussian"];

fn derived(model: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let plain = std::fs::read(require(&format!("models/{model}"))?).expect("model file");
    let opts = GradOptions {
        std: STD.to_vec(),
        raw_gradient: true,
        ..Default::default()
    };
    let d = derive(&plain, &opts).expect("derive");
    eprintln!("{model}:\n{}", d.summary);
    Some((plain, d.bytes))
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn max_softmax(z: &[f64], t: f64) -> f64 {
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let s: f64 = z.iter().map(|v| ((v - m) / t).exp()).sum();
    1.0 / s
}

#[test]
fn resnet20_matches_the_pytorch_reference() {
    let (plain, g_bytes) = require!(derived("resnet20_cifar10.onnx"));
    let mut g = session(&g_bytes);
    let mut f = session(&plain);
    let (i_logits, i_pert, i_grad) = (
        output_index(&g, "logits"),
        output_index(&g, "perturbed"),
        output_index(&g, "gradient"),
    );
    let mut below: Vec<f64> = vec![];
    let mut diffs: Vec<f64> = vec![];
    let (mut worst_cos, mut flips, mut counted, mut within, mut total, mut worst_score) =
        (1.0f64, 0usize, 0usize, 0usize, 0usize, 0.0f64);
    for set in SETS {
        let dir = data_dir().join("reference/resnet20").join(set);
        let pixels = std::fs::read(dir.join("images.u8")).unwrap();
        let n = pixels.len() / (32 * 32 * 3);
        let x = normalize_batch(&pixels, n, &MEAN, &STD);
        let ref_grad = read_f32(&dir.join("grad_T1000.f32"));
        let ref_score = read_f32(&dir.join("odin_T1000_eps0.0014.f32"));
        let ref_logits = read_f32(&dir.join("logits.f32"));
        let per = 3 * 32 * 32;
        let batch = 64;
        let (mut set_cos, mut set_flips, mut set_within) = (1.0f64, 0, 0);
        for b0 in (0..n).step_by(batch) {
            let b = batch.min(n - b0);
            let xs = &x[b0 * per..(b0 + b) * per];
            let out = run(
                &mut g,
                "input",
                &[b as i64, 3, 32, 32],
                xs,
                &[("temperature", T), ("epsilon", EPS)],
            );
            for (k, (l, r)) in out[i_logits]
                .iter()
                .zip(&ref_logits[b0 * 10..(b0 + b) * 10])
                .enumerate()
            {
                assert!(
                    (l - f64::from(*r)).abs() < 1e-4,
                    "logit {k} of batch at {b0} in {set}: {l} vs {r}"
                );
            }
            let pert: Vec<f32> = out[i_pert].iter().map(|&v| v as f32).collect();
            let z2 = run(&mut f, "input", &[b as i64, 3, 32, 32], &pert, &[]);
            for i in 0..b {
                let gi = &out[i_grad][i * per..(i + 1) * per];
                let ri: Vec<f64> = ref_grad[(b0 + i) * per..(b0 + i + 1) * per]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let cos = cosine(gi, &ri);
                set_cos = set_cos.min(cos);
                if cos < 0.9999 {
                    // A ReLU pre-activation within float noise of zero makes
                    // the gradient itself ill-conditioned: check that the
                    // graph's gradient at batch 1, or at an input within 1e-5 relative of x,
                    // matches, so only rounding, not the graph, differs.
                    let xi = &xs[i * per..(i + 1) * per];
                    let nearby = [1.0f32, 1.0 + 1e-6, 1.0 - 1e-6, 1.0 + 1e-5, 1.0 - 1e-5]
                        .iter()
                        .map(|s| {
                            let xp: Vec<f32> = xi.iter().map(|v| v * s).collect();
                            let o = run(
                                &mut g,
                                "input",
                                &[1, 3, 32, 32],
                                &xp,
                                &[("temperature", T), ("epsilon", EPS)],
                            );
                            cosine(&o[i_grad], &ri)
                        })
                        .fold(f64::MIN, f64::max);
                    eprintln!("  {set} image {}: cosine {cos:.7}; best at batch 1 / x·(1±1e-6, 1±1e-5): {nearby:.7}", b0 + i);
                    below.push(nearby);
                }
                let max = ri.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (a, r) in gi.iter().zip(&ri) {
                    if r.abs() > 1e-3 * max {
                        counted += 1;
                        if (*a >= 0.0) != (*r >= 0.0) {
                            set_flips += 1;
                        }
                    }
                }
                let score = max_softmax(&z2[0][i * 10..(i + 1) * 10], f64::from(T));
                let d = (score - f64::from(ref_score[b0 + i])).abs();
                worst_score = worst_score.max(d);
                diffs.push(d);
                if d <= 2e-6 {
                    set_within += 1;
                }
            }
        }
        eprintln!(
            "{set}: n={n} min cosine {set_cos:.7}, sign flips {set_flips}, scores within 2e-6: {set_within}/{n}"
        );
        worst_cos = worst_cos.min(set_cos);
        flips += set_flips;
        within += set_within;
        total += n;
    }
    let agree = 1.0 - flips as f64 / counted as f64;
    eprintln!(
        "all: min cosine {worst_cos:.7}, sign agreement {agree:.7} ({flips} of {counted}), scores within 2e-6 {within}/{total}, max |Δscore| {worst_score:.2e}"
    );
    eprintln!(
        "images with cosine >= 0.9999: {}/{total}",
        total - below.len()
    );
    diffs.sort_by(f64::total_cmp);
    eprintln!(
        "|Δscore|: median {:.1e}, 99th percentile {:.1e}, max {:.1e}",
        diffs[diffs.len() / 2],
        diffs[diffs.len() * 99 / 100],
        diffs[diffs.len() - 1]
    );
    assert!(
        below.len() as f64 <= 0.01 * total as f64,
        "{} images below cosine 0.9999",
        below.len()
    );
    assert!(
        below.iter().all(|&c| c >= 0.9999),
        "below 0.9999 even within 1e-5 of x: {below:?}"
    );
    assert!(worst_cos >= 0.999, "min cosine {worst_cos}");
    assert!(agree >= 0.999, "sign agreement {agree}");
    assert!(
        within as f64 >= 0.99 * total as f64,
        "{within}/{total} scores within 2e-6"
    );
}

#[test]
fn resnet56_gradient_matches_finite_differences() {
    let (plain, g_bytes) = require!(derived("resnet56_cifar10.onnx"));
    let mut g = session(&g_bytes);
    let mut f = session(&plain);
    let dir = data_dir().join("reference/resnet20/cifar10");
    let pixels = std::fs::read(dir.join("images.u8")).unwrap();
    let per = 3 * 32 * 32;
    let x = normalize_batch(&pixels[..2 * per], 2, &MEAN, &STD);
    // T = 10 keeps softmax(z/T) away from saturation, so the loss and its
    // gradient are large next to float32 rounding of the logits (at T = 1
    // these confident images have |g| ~ 1e-5, the size of the differences'
    // rounding error). The graph takes T as an input.
    let t = 10.0f32;
    let out = run(
        &mut g,
        "input",
        &[2, 3, 32, 32],
        &x,
        &[("temperature", t), ("epsilon", EPS)],
    );
    let grad = &out[output_index(&g, "gradient")];
    let z = &out[output_index(&g, "logits")];
    let yhat: Vec<usize> = z
        .chunks(10)
        .map(|zi| (0..10).fold(0, |b, i| if zi[i] > zi[b] { i } else { b }))
        .collect();
    let loss = |f: &mut ort::session::Session, x: &[f32]| -> f64 {
        let zs = run(f, "input", &[2, 3, 32, 32], x, &[]);
        zs[0]
            .chunks(10)
            .zip(&yhat)
            .map(|(zi, &y)| {
                let m = zi.iter().cloned().fold(f64::MIN, f64::max);
                zi.iter()
                    .map(|v| ((v - m) / f64::from(t)).exp())
                    .sum::<f64>()
                    .ln()
                    + m / f64::from(t)
                    - zi[y] / f64::from(t)
            })
            .sum()
    };
    // The five largest coordinates of each image, and three random
    // directions (g·v sums many coordinates: a large, robust signal).
    let mut coords: Vec<usize> = (0..grad.len()).collect();
    coords.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
    let mut checked = 0;
    for &c in coords.iter().take(10) {
        let h = 1e-4f32;
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[c] += h;
        xm[c] -= h;
        // The step actually taken: x ± h rounds in float32.
        let step = f64::from(xp[c]) - f64::from(xm[c]);
        let fd = (loss(&mut f, &xp) - loss(&mut f, &xm)) / step;
        let rel = (fd - grad[c]).abs() / grad[c].abs();
        eprintln!(
            "resnet56 coordinate {c}: gradient {:.6e}, central difference {fd:.6e} (rel {rel:.1e})",
            grad[c]
        );
        assert!(rel < 0.05, "coordinate {c}: {} vs {fd}", grad[c]);
        checked += 1;
    }
    let mut rng = Rng::new(56);
    for k in 0..3 {
        let v: Vec<f32> = (0..x.len()).map(|_| rng.range(-1.0, 1.0) as f32).collect();
        let gv: f64 = grad.iter().zip(&v).map(|(a, b)| a * f64::from(*b)).sum();
        let h = 1e-4f32;
        let xp: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a + h * b).collect();
        let xm: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a - h * b).collect();
        let fd = (loss(&mut f, &xp) - loss(&mut f, &xm)) / (2.0 * f64::from(h));
        let rel = (fd - gv).abs() / gv.abs();
        eprintln!(
            "resnet56 direction {k}: g·v {gv:.6e}, central difference {fd:.6e} (rel {rel:.1e})"
        );
        assert!(rel < 0.02, "direction {k}: {gv} vs {fd}");
        checked += 1;
    }
    assert_eq!(checked, 13);
}
