//! The statistics file: round trips, and corrupted or mismatched files are
//! refused with an error that names the problem.

use std::collections::{BTreeMap, HashMap};

use odin_sidecar::fit::rng::SplitMix64;
use odin_sidecar::fit::stats::{names, ModelInfo, Stats, StatsError, META_KEY};
use odin_sidecar::fit::{FitConfig, Fitter};
use odin_sidecar::score::{Detector, DetectorError, FeatureBatch, Knn, React};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::Value;

fn small_stats(bank_max_rows: usize) -> Stats {
    let (k, d, n) = (3usize, 8usize, 200usize);
    let mut rng = SplitMix64::new(1);
    let mut g = || rng.next_f64() - 0.5;
    let w: Vec<f32> = (0..k * d).map(|_| g() as f32).collect();
    let b: Vec<f32> = (0..k).map(|_| g() as f32).collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let x: Vec<f32> = (0..n * d)
        .map(|i| (g() + 2.0 * ((i / d) % k == i % d % k) as u8 as f64).abs() as f32)
        .collect();
    let z: Vec<f32> = x
        .chunks_exact(d)
        .flat_map(|h| {
            (0..k)
                .map(|c| {
                    (f64::from(b[c])
                        + (0..d)
                            .map(|j| f64::from(w[c * d + j]) * f64::from(h[j]))
                            .sum::<f64>()) as f32
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let mut cfg = FitConfig::new(k, d);
    cfg.bank_max_rows = bank_max_rows.max(1);
    cfg.keep_bank = bank_max_rows > 0;
    let model = ModelInfo {
        name: "toy".into(),
        sha256: "c0ffee".repeat(10) + "abcd",
        feature_tensor: "/avgpool/Flatten_output_0".into(),
    };
    let mut f = Fitter::new(cfg, model, "toy train", &w, &b).unwrap();
    f.push(
        FeatureBatch {
            logits: &z,
            features: &x,
            n,
        },
        &labels,
    )
    .unwrap();
    f.finish().unwrap().0
}

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Re-serializes a statistics file after `edit` changed its metadata JSON or
/// tensors (bypassing `Stats::to_bytes`' validation).
fn rewrite(bytes: &[u8], edit: impl FnOnce(&mut Value, &mut Tensors)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let mut meta: Value =
        serde_json::from_str(&header.metadata().as_ref().unwrap()[META_KEY]).unwrap();
    let mut tensors: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    edit(&mut meta, &mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (dt, sh, data))| (n.clone(), TensorView::new(*dt, sh.clone(), data).unwrap()))
        .collect();
    let header = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
    safetensors::serialize(views, Some(header)).unwrap()
}

fn err(bytes: &[u8]) -> StatsError {
    Stats::from_bytes(bytes).unwrap_err()
}

#[test]
fn round_trips_exactly_through_bytes_and_files() {
    for bank in [50_000, 0, 17] {
        let s = small_stats(bank);
        let bytes = s.to_bytes().unwrap();
        assert_eq!(Stats::from_bytes(&bytes).unwrap(), s);
        let dir =
            std::env::temp_dir().join(format!("detectors-stats-{}-{bank}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fit.safetensors");
        s.save(&path).unwrap();
        assert_eq!(Stats::load(&path).unwrap(), s);
        std::fs::remove_dir_all(&dir).ok();
    }
    let s = small_stats(0);
    assert!(!s.meta.supports.contains(&"knn".to_string()));
    assert!(matches!(Knn::new(&s, 5), Err(DetectorError::Missing(_))));
    let s = small_stats(17);
    assert_eq!(
        (s.bank_rows(), s.meta.bank.sampling.as_str()),
        (17, "reservoir")
    );
    assert_eq!(s.meta.subsample_rows, 17);
}

#[test]
fn the_file_is_plain_safetensors_with_documented_names() {
    let s = small_stats(50_000);
    let bytes = s.to_bytes().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut got: Vec<&str> = st.names();
    got.sort();
    let mut want = vec![
        names::FC_WEIGHT,
        names::FC_BIAS,
        names::TRAIN_MEAN,
        names::CLASS_MEANS,
        names::CLASS_COUNTS,
        names::PRECISION,
        names::BACKGROUND_PRECISION,
        names::VIM_ORIGIN,
        names::VIM_EIGENVECTORS,
        names::VIM_MEAN_MAX_LOGIT,
        names::VIM_MEAN_RESIDUAL,
        names::VIM_EIGENVALUES,
        names::REACT_PERCENTILES,
        names::REACT_CLIP,
        names::KNN_BANK,
    ];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(st.tensor(names::VIM_EIGENVECTORS).unwrap().shape(), &[8, 8]);
    assert_eq!(st.tensor(names::VIM_MEAN_RESIDUAL).unwrap().shape(), &[7]);
    assert_eq!(
        st.tensor(names::VIM_MEAN_MAX_LOGIT).unwrap().shape(),
        &[] as &[usize]
    );
    assert_eq!(st.tensor(names::KNN_BANK).unwrap().dtype(), Dtype::F32);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta: Value = serde_json::from_str(&header.metadata().as_ref().unwrap()[META_KEY]).unwrap();
    assert_eq!(meta["format"], "odin-sidecar.fit-stats");
    assert_eq!(meta["version"], 1);
    assert_eq!(meta["model"]["feature_tensor"], "/avgpool/Flatten_output_0");
    assert_eq!(meta["dim"], 8);
    assert_eq!(meta["num_classes"], 3);
    assert_eq!(meta["n_train"], 200);
}

#[test]
fn corrupted_files_name_the_problem() {
    let s = small_stats(50_000);
    let good = s.to_bytes().unwrap();

    // Not safetensors at all / truncated.
    assert!(matches!(err(b"hello"), StatsError::Format(_)));
    assert!(matches!(
        err(&good[..good.len() - 3]),
        StatsError::Format(_)
    ));
    let mut bad_len = good.clone();
    bad_len[0] ^= 0x40;
    assert!(matches!(err(&bad_len), StatsError::Format(_)));

    // A safetensors file that is not ours.
    let other = safetensors::serialize(
        [(
            "x",
            TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap(),
        )],
        None,
    )
    .unwrap();
    assert!(matches!(err(&other), StatsError::NotStats));

    // A newer version says so, whatever else changed.
    let e = err(&rewrite(&good, |m, _| {
        m["version"] = 2.into();
        m["dim"] = "bogus".into();
    }));
    assert!(
        matches!(
            e,
            StatsError::Version {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 2"), "{e}");
    let e = err(&rewrite(&good, |m, _| {
        m["format"] = "something-else".into()
    }));
    assert!(matches!(e, StatsError::Version { .. }), "{e}");

    // Metadata that does not parse into the schema.
    let e = err(&rewrite(&good, |m, _| m["dim"] = "eight".into()));
    assert!(matches!(e, StatsError::Metadata(_)), "{e}");

    // Missing tensor.
    let e = err(&rewrite(&good, |_, t| {
        t.remove(names::VIM_MEAN_MAX_LOGIT);
    }));
    assert_eq!(e.to_string(), "tensor `vim.mean_max_logit` is missing");

    // Wrong shape: D − 1 columns.
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::PRECISION).unwrap();
        p.1 = vec![8, 7];
        p.2.truncate(8 * 7 * 8);
    }));
    assert_eq!(
        e.to_string(),
        "tensor `mds.precision` has shape [8, 7], expected [8, 8]"
    );

    // Metadata D disagrees with the tensors.
    let e = err(&rewrite(&good, |m, _| m["dim"] = 9.into()));
    assert!(matches!(e, StatsError::Shape { .. }), "{e}");

    // Wrong dtype.
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::TRAIN_MEAN).unwrap();
        p.0 = Dtype::F32;
        p.2.truncate(8 * 4);
    }));
    assert_eq!(e.to_string(), "tensor `train_mean` is F32, expected F64");

    // Non-finite value.
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::CLASS_MEANS).unwrap();
        p.2[5 * 8..6 * 8].copy_from_slice(&f64::NAN.to_le_bytes());
    }));
    assert_eq!(
        e.to_string(),
        "tensor `class_means` has a non-finite value at flat index 5"
    );
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::KNN_BANK).unwrap();
        p.2[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    }));
    assert!(
        matches!(
            e,
            StatsError::NonFinite {
                name: "knn.bank",
                index: 0
            }
        ),
        "{e}"
    );

    // Values out of range.
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::KNN_BANK).unwrap();
        p.2[..4].copy_from_slice(&3.0f32.to_le_bytes());
    }));
    assert!(e.to_string().contains("row 0 has squared norm"), "{e}");
    let e = err(&rewrite(&good, |_, t| {
        let p = t.get_mut(names::PRECISION).unwrap();
        p.2[8..16].copy_from_slice(&1234.5f64.to_le_bytes());
    }));
    assert!(e.to_string().contains("not symmetric at [0, 1]"), "{e}");
    let e = err(&rewrite(&good, |m, _| m["n_train"] = 199.into()));
    assert!(e.to_string().contains("n_train = 199"), "{e}");
    let e = err(&rewrite(&good, |m, _| m["vim_dim"] = 8.into()));
    assert!(e.to_string().contains("vim_dim"), "{e}");

    // The file is fine but fitted for another model.
    let s = Stats::from_bytes(&good).unwrap();
    assert!(s.check_model(&s.meta.model.sha256.to_uppercase()).is_ok());
    let e = s.check_model(&"0".repeat(64)).unwrap_err();
    assert!(e.to_string().contains("fitted for model \"toy\""), "{e}");

    // Unreadable path.
    let e = Stats::load("/nonexistent/fit.safetensors").unwrap_err();
    assert!(
        matches!(e, StatsError::Io { .. })
            && e.to_string().starts_with("/nonexistent/fit.safetensors")
    );
}

#[test]
fn detectors_refuse_hyper_parameters_the_stats_cannot_serve() {
    let s = small_stats(50_000);
    let e = React::new(&s, 80.0).unwrap_err();
    assert!(e.to_string().contains("not fitted"), "{e}");
    assert_eq!(React::new(&s, 90.0).unwrap().tag(), "react(p=90)");
    assert!(Knn::new(&s, 201).is_err());
    assert_eq!(Knn::new(&s, 200).unwrap().tag(), "knn(k=200)");
}
