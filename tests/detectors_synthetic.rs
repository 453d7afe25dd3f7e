//! Agreement with the independent NumPy reference
//! (`scripts/reference/detectors_ref.py` → `tests/data/detectors/synthetic_k10_d64.safetensors`):
//! the Rust fitter fits its own statistics from the same float32 inputs,
//! streaming them in uneven batches, saves and reloads them, and every
//! detector's scores on the 300 test frames are compared with NumPy's.
//!
//! Run with `--nocapture` to see the error table.

use std::collections::BTreeMap;

use odin_sidecar::fit::{FitConfig, FitReport, Fitter, Stats, StatsModel as ModelInfo};
use odin_sidecar::score::{
    score_norm as calibrate, Combined, Detector, Fdbd, FdbdNormalizer, FeatureBatch, Gen, Knn, Mds,
    React, Rmds, ScoreNorm, Vim,
};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

const DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/detectors/synthetic_k10_d64.safetensors"
);

struct Reference {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    params: Value,
}

impl Reference {
    fn load() -> Self {
        let bytes =
            std::fs::read(DATA).expect("reference data: run scripts/reference/detectors_ref.py");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let params = meta.metadata().as_ref().unwrap()["params"].clone();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
            .collect();
        Self {
            tensors,
            params: serde_json::from_str(&params).unwrap(),
        }
    }

    fn get(&self, name: &str) -> &(Dtype, Vec<usize>, Vec<u8>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no {name}"))
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        let (dt, _, b) = self.get(name);
        assert_eq!(*dt, Dtype::F32, "{name}");
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn f64(&self, name: &str) -> Vec<f64> {
        let (dt, _, b) = self.get(name);
        assert_eq!(*dt, Dtype::F64, "{name}");
        b.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i64(&self, name: &str) -> Vec<i64> {
        let (dt, _, b) = self.get(name);
        assert_eq!(*dt, Dtype::I64, "{name}");
        b.chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// max |a − b| / max |b| (error relative to the quantity's scale).
fn scaled_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// max |a − b| / |b|, elementwise.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs() / b.abs()))
}

fn fit(r: &Reference) -> (Stats, FitReport) {
    let (k, d) = (10, 64);
    let x = r.f32("train.features");
    let z = r.f32("train.logits");
    let y: Vec<u32> = r.i64("train.labels").iter().map(|v| *v as u32).collect();
    let mut cfg = FitConfig::new(k, d);
    cfg.vim_dim = Some(r.params["vim_dim"].as_u64().unwrap() as usize);
    cfg.react_percentiles = r.params["react_percentiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let model = ModelInfo {
        name: "synthetic".into(),
        sha256: "ab".repeat(32),
        feature_tensor: "features".into(),
    };
    let mut f = Fitter::new(
        cfg,
        model,
        "detectors_ref.py train split",
        &r.f32("fc.weight"),
        &r.f32("fc.bias"),
    )
    .unwrap();
    // Uneven streaming batches.
    let n = y.len();
    let mut start = 0;
    for size in [1usize, 333, 64].iter().cycle() {
        if start == n {
            break;
        }
        let m = (*size).min(n - start);
        let batch = FeatureBatch {
            logits: &z[start * k..(start + m) * k],
            features: &x[start * d..(start + m) * d],
            n: m,
        };
        f.push(batch, &y[start..start + m]).unwrap();
        start += m;
    }
    f.finish().unwrap()
}

fn score(det: &dyn Detector, h: &[f32], z: &[f32], n: usize, chunk: usize) -> Vec<f64> {
    let (k, d) = (10, 64);
    let mut out = vec![0.0f32; n];
    for s in (0..n).step_by(chunk) {
        let m = chunk.min(n - s);
        let batch = FeatureBatch {
            logits: &z[s * k..(s + m) * k],
            features: &h[s * d..(s + m) * d],
            n: m,
        };
        det.score_batch(batch, &mut out[s..s + m]).unwrap();
    }
    out.iter().map(|v| f64::from(*v)).collect()
}

#[test]
fn fit_and_scores_match_numpy() {
    let r = Reference::load();
    let (fitted, report) = fit(&r);
    println!("fit report: {report:#?}");

    // Save, reload: the detectors run on what the file gives back.
    let dir = std::env::temp_dir().join(format!("detectors-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stats.safetensors");
    fitted.save(&path).unwrap();
    let stats = Stats::load(&path).unwrap();
    assert_eq!(stats, fitted, "file round trip is exact");
    std::fs::remove_dir_all(&dir).ok();

    // ---- Fit statistics.
    let (k, d) = (10usize, 64usize);
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    let mut check = |name: &str, got: &[f64], want: &[f64], tol: f64| {
        let e = scaled_err(got, want);
        rows.push((name.to_string(), e, f64::NAN));
        assert!(e <= tol, "{name}: scaled error {e:e} > {tol:e}");
    };
    check(
        "class_means",
        &stats.class_means,
        &r.f64("expected.stats.class_means"),
        1e-12,
    );
    check(
        "train_mean",
        &stats.train_mean,
        &r.f64("expected.stats.train_mean"),
        1e-12,
    );
    check(
        "mds.precision",
        &stats.precision,
        &r.f64("expected.stats.mds.precision"),
        1e-9,
    );
    check(
        "rmds.background_precision",
        &stats.background_precision,
        &r.f64("expected.stats.rmds.background_precision"),
        1e-9,
    );
    check(
        "vim.origin",
        &stats.vim_origin,
        &r.f64("expected.stats.vim.origin"),
        1e-9,
    );
    check(
        "vim.eigenvalues",
        &stats.vim_eigenvalues,
        &r.f64("expected.stats.vim.eigenvalues"),
        1e-10,
    );
    check(
        "vim.alpha",
        &[Vim::new(&stats, None).unwrap().alpha()],
        &r.f64("expected.stats.vim.alpha"),
        1e-10,
    );
    check(
        "react.clip",
        &stats.react_clip,
        &r.f64("expected.stats.react.clip"),
        1e-12,
    );
    // The null space is defined up to a rotation: compare projectors NS·NSᵀ.
    let cols = d - stats.meta.vim_dim;
    let null_space: Vec<f64> = (0..d)
        .flat_map(|i| stats.vim_eigenvectors[i * d + stats.meta.vim_dim..(i + 1) * d].to_vec())
        .collect();
    let projector = |ns: &[f64]| {
        let mut p = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                p[i * d + j] = (0..cols).map(|c| ns[i * cols + c] * ns[j * cols + c]).sum();
            }
        }
        p
    };
    check(
        "vim.null_space (projector)",
        &projector(&null_space),
        &projector(&r.f64("expected.stats.vim.null_space")),
        1e-9,
    );
    let acc = r.f64("expected.stats.train_accuracy")[0];
    assert!((report.train_accuracy - acc).abs() < 1e-12);
    // The bank is the normalised training set, in order (N < bank cap).
    let x = r.f32("train.features");
    for (row, brow) in x
        .chunks_exact(d)
        .zip(stats.knn_bank.chunks_exact(d))
        .take(50)
    {
        let n = row
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        for (a, b) in row.iter().zip(brow) {
            assert_eq!(*b, (f64::from(*a) / n) as f32);
        }
    }

    // ---- Scores.
    let h = r.f32("test.features");
    let z = r.f32("test.logits");
    let n = h.len() / d;
    let mut dets: Vec<Box<dyn Detector>> = vec![
        Box::new(Vim::new(&stats, None).unwrap()),
        Box::new(Mds::new(&stats).unwrap()),
        Box::new(Rmds::new(&stats).unwrap()),
        Box::new(Fdbd::new(&stats, FdbdNormalizer::TrainMean).unwrap()),
        Box::new(Fdbd::new(&stats, FdbdNormalizer::FeatureNorm).unwrap()),
    ];
    for kk in r.params["knn_ks"].as_array().unwrap() {
        dets.push(Box::new(
            Knn::new(&stats, kk.as_u64().unwrap() as usize).unwrap(),
        ));
    }
    for p in &stats.react_percentiles {
        dets.push(Box::new(React::new(&stats, *p).unwrap()));
    }
    for gm in r.params["gen"].as_array().unwrap() {
        let (g, m) = (gm[0].as_f64().unwrap(), gm[1].as_u64().unwrap() as usize);
        dets.push(Box::new(Gen::new(k, g, m).unwrap()));
    }
    // Combination: calibrate on the validation split, as the reference.
    let (hv, zv) = (r.f32("val.features"), r.f32("val.logits"));
    let nv = hv.len() / d;
    let val_batches = |chunk: usize| {
        let (hv, zv) = (&hv, &zv);
        (0..nv).step_by(chunk).map(move |s| {
            let m = chunk.min(nv - s);
            FeatureBatch {
                logits: &zv[s * k..(s + m) * k],
                features: &hv[s * d..(s + m) * d],
                n: m,
            }
        })
    };
    let want_cal = &r.params["combination"]["calibration"];
    let mut parts: Vec<(Box<dyn Detector>, ScoreNorm, f64)> = Vec::new();
    for part in r.params["combination"]["parts"].as_array().unwrap() {
        let (tag, w) = (part[0].as_str().unwrap(), part[1].as_f64().unwrap());
        let det: Box<dyn Detector> = match tag {
            "knn(k=50)" => Box::new(Knn::new(&stats, 50).unwrap()),
            t if t.starts_with("vim") => Box::new(Vim::new(&stats, None).unwrap()),
            t => panic!("unexpected part {t}"),
        };
        assert_eq!(det.tag(), tag);
        let norm = calibrate(det.as_ref(), val_batches(50)).unwrap();
        let (wm, ws) = (
            want_cal[tag]["mean"].as_f64().unwrap(),
            want_cal[tag]["std"].as_f64().unwrap(),
        );
        rows.push((
            format!("calibration {tag} mean"),
            ((norm.mean - wm) / wm).abs(),
            f64::NAN,
        ));
        rows.push((
            format!("calibration {tag} std"),
            ((norm.std - ws) / ws).abs(),
            f64::NAN,
        ));
        assert!(((norm.mean - wm) / ws).abs() < 1e-6 && ((norm.std - ws) / ws).abs() < 1e-6);
        parts.push((det, norm, w));
    }
    dets.push(Box::new(Combined::new(parts).unwrap()));

    println!(
        "\n{:<46} {:>12} {:>12}",
        "detector / statistic", "max err/scale", "max rel err"
    );
    for (name, e, _) in &rows {
        println!("{name:<46} {e:>12.2e}");
    }
    let mut failures = Vec::new();
    for det in &dets {
        let tag = det.tag();
        let want = r.f64(&format!("expected.score.{tag}"));
        // Batches of 32 (the serving batch) and the whole set in one call.
        let got = score(det.as_ref(), &h, &z, n, 32);
        let whole = score(det.as_ref(), &h, &z, n, n);
        assert_eq!(got, whole, "{tag}: batching changes nothing");
        let (es, er) = (scaled_err(&got, &want), rel_err(&got, &want));
        println!("{tag:<46} {es:>12.2e} {er:>12.2e}");
        // Tolerance: 1e-6 relative to the score's scale (max |score| over the
        // test set); everything is f64 inside and the f32 output rounding is
        // 6e-8 relative. Pure relative error is not bounded for scores that
        // cross zero (vim, rmds, combined), see the table.
        if es > 1e-6 {
            failures.push(format!("{tag}: {es:e}"));
        }
        // And on every frame where |score| is at least 1 % of the scale,
        // 1e-5 relative (the brief's bound).
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if w.abs() >= 0.01 * scale && (g - w).abs() > 1e-5 * w.abs() {
                failures.push(format!("{tag}: frame {i}: {g} vs {w}"));
            }
        }
        // Same ranking of ID vs OOD (AUROC) as the reference.
        let is_id = r.i64("test.is_id");
        let want_auroc = r.params["auroc"][&tag].as_f64().unwrap();
        let (mut gt, mut ties, mut pairs) = (0.0, 0.0, 0.0);
        for i in 0..n {
            for j in 0..n {
                if is_id[i] == 1 && is_id[j] == 0 {
                    pairs += 1.0;
                    if got[i] > got[j] {
                        gt += 1.0;
                    } else if got[i] == got[j] {
                        ties += 1.0;
                    }
                }
            }
        }
        let auroc = (gt + 0.5 * ties) / pairs;
        assert!(
            (auroc - want_auroc).abs() < 1e-3,
            "{tag}: AUROC {auroc} vs {want_auroc}"
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
