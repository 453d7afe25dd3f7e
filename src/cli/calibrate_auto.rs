//! `calibrate --auto`: search methods and hyper-parameters on the tuning
//! split (see `calib::search`), then write the chosen detector — its
//! method, T and ε, the fit statistics it needs, the z-score statistics of
//! a combination — and its threshold, computed by the serving path itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::calibrate::{progress, CalibrateArgs};
use crate::app::Offline;
use crate::calib::calibrate::{
    self, Calibration, Candidate, CombinationSpec, FitData, PartSpec, PointMetrics, StatsRef,
    TEMPERATURES,
};
use crate::calib::metrics;
use crate::calib::search::{Choice, Quality, Search, SearchOptions, Spec};
use crate::calib::sets::{Set, SetSource};
use crate::fit::train::{self, FitJob, TrainSet};
use crate::fit::{FitConfig, Stats, StatsModel};
use crate::score::{BatchView, LoadedStats, Method, ScoreNorm, Scorers, Scoring};

/// Loads a statistics file for the search, checked against the model.
pub fn load_stats(path: &Path, model_sha: &str) -> anyhow::Result<Arc<LoadedStats>> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("--fit-stats {}: {e}", path.display()))?;
    let sha = crate::model::sha256_hex(&bytes);
    let stats = Stats::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("--fit-stats {}: {e}", path.display()))?;
    stats
        .check_model(model_sha)
        .map_err(|e| anyhow::anyhow!("--fit-stats {}: {e}", path.display()))?;
    let name = path
        .file_name()
        .map_or_else(|| "fit-stats".into(), |n| n.to_string_lossy().into_owned());
    Ok(Arc::new(LoadedStats::new(
        stats,
        format!("{name} (sha256 {}…)", &sha[..8]),
        sha,
    )))
}

/// `target` as the calibration file at `output` should name it: its file
/// name when they share a folder, else its absolute path.
fn reference(target: &Path, output: &Path) -> String {
    let folder = |p: &Path| {
        p.parent()
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .and_then(|d| d.canonicalize().ok())
    };
    if folder(target).is_some() && folder(target) == folder(output) {
        if let Some(name) = target.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    target
        .canonicalize()
        .unwrap_or_else(|_| target.to_path_buf())
        .display()
        .to_string()
}

/// Runs `calibrate --auto`.
pub fn run(args: &CalibrateArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.model.config()?;
    let Offline {
        model,
        graphs,
        mut engine,
        preprocessor: pre,
    } = Offline::load(&config)?;
    anyhow::ensure!(
        engine.can_perturb(),
        "the gradient graph could not be derived for this model"
    );
    let model_sha = crate::model::sha256_hex(&model.onnx);
    let dim = engine.feature_dim();
    let mut paths: Vec<PathBuf> = config.fit_stats.clone();
    let stats = paths
        .iter()
        .map(|p| load_stats(p, &model_sha))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if stats.is_empty() {
        eprintln!(
            "no --fit-stats: searching the logit methods only (fit the training statistics with `odin-sidecar fit` for the feature-space detectors)"
        );
    }
    let id = Set::load(&SetSource::parse(&args.id), &pre, 0, Some(args.tune))?;
    let oods = args
        .ood
        .iter()
        .map(|s| Set::load(&SetSource::parse(s), &pre, 0, Some(args.tune)))
        .collect::<Result<Vec<_>, _>>()?;
    let epsilons = calibrate::epsilons();
    let options = SearchOptions::new(dim, TEMPERATURES.to_vec(), epsilons.clone(), args.tpr);
    let mut search = Search::new(options, stats, dim);
    let started = Instant::now();
    let total = (id.n + oods.iter().map(|s| s.n).sum::<usize>()) * TEMPERATURES.len();
    let mut done = 0;
    let std = model.card.input.std.clone();
    let chw = pre.chw();
    let mut firsts = Vec::new();
    eprintln!(
        "searching on {} ID and {} pooled OOD tuning images: ODIN's {} T × {} ε grid, {} statistics file(s)",
        id.n,
        oods.iter().map(|s| s.n).sum::<usize>(),
        TEMPERATURES.len(),
        epsilons.len(),
        search.stats.len()
    );
    for (set, ood) in std::iter::once((&id, false)).chain(oods.iter().map(|s| (s, true))) {
        search.run_grid(&mut engine, set, ood, &std, chw, &mut firsts, |n| {
            done += n;
            progress(done, total, started, "image-passes");
        })?;
    }
    eprintln!();
    // The detectors with statistics of perturbed training features.
    if let Some(train_path) = &args.train {
        let odin = search
            .best_odin()
            .and_then(|s| s.perturbation)
            .ok_or_else(|| anyhow::anyhow!("no ODIN point with ε > 0 was scored"))?;
        let taps = graphs
            .taps
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("--train needs the model's penultimate features"))?;
        let set = TrainSet::open(train_path, &model.card.labels)?;
        let indices = train::spread(set.len(), args.train_limit);
        let mut fit_config = FitConfig::new(taps.classes, taps.dim);
        fit_config.bank_max_rows = args.bank_rows.max(1);
        fit_config.keep_bank = args.bank_rows > 0;
        let job = FitJob {
            config: fit_config,
            model: StatsModel {
                name: model.card.name.clone(),
                sha256: model_sha.clone(),
                feature_tensor: taps.features.clone(),
            },
            fc_weight: taps.fc_weight.clone(),
            fc_bias: taps.fc_bias.clone(),
            perturbation: Some(odin),
            batch: 128,
        };
        eprintln!(
            "fitting statistics of training features perturbed at the best ODIN point T = {}, ε = {} ({} of {})",
            odin.temperature,
            odin.epsilon,
            indices.len(),
            set.description
        );
        let fit_started = Instant::now();
        let n = indices.len();
        let (stats, _) = train::fit(
            &mut engine,
            &pre,
            &set,
            &indices,
            job,
            |d| progress(d, n, fit_started, "images"),
            |_, _, _| {},
        )?;
        eprintln!();
        let stem = args.output.file_stem().map_or_else(
            || "calibration".into(),
            |s| s.to_string_lossy().into_owned(),
        );
        let path = args.output.with_file_name(format!(
            "{stem}.fit-T{}-e{}.safetensors",
            odin.temperature, odin.epsilon
        ));
        stats.save(&path)?;
        eprintln!("wrote {}", path.display());
        let loaded = load_stats(&path, &model_sha)?;
        let index = search.add_stats(loaded, dim);
        paths.push(path);
        let mut first = None;
        for (set, ood) in std::iter::once((&id, false)).chain(oods.iter().map(|s| (s, true))) {
            search.run_point(&mut engine, set, ood, odin, index, &mut first)?;
        }
    }
    // Singles and pairs.
    let ranked = search.ranked();
    anyhow::ensure!(!ranked.is_empty(), "no candidate could be scored");
    let pairs = search.pairs();
    let (best_single, q_single) = ranked[0];
    let mut choice = Choice::Single(search.scored[best_single].spec);
    let mut quality = q_single;
    let mut norms = None;
    if let Some((pair, q, n)) = pairs.first() {
        if q.better(&q_single) {
            choice = pair.clone();
            quality = *q;
            norms = Some(*n);
        }
    }
    let label = choice.label(&search.stats);
    eprintln!(
        "searched {} single detectors and {} weighted pairs in {:.0} s; best: {label} (tuning FPR {:.4}, AUROC {:.4})",
        ranked.len(),
        pairs.len(),
        started.elapsed().as_secs_f64(),
        quality.fpr,
        quality.auroc
    );
    let mut leaderboard: Vec<(String, Quality)> = ranked
        .iter()
        .take(25)
        .map(|(i, q)| (search.scored[*i].spec.label(&search.stats), *q))
        .chain(
            pairs
                .iter()
                .take(15)
                .map(|(c, q, _)| (c.label(&search.stats), *q)),
        )
        .collect();
    leaderboard.sort_by(|a, b| {
        a.1.fpr
            .total_cmp(&b.1.fpr)
            .then(b.1.auroc.total_cmp(&a.1.auroc))
    });
    eprintln!("\n| candidate (tuning split) | FPR | AUROC |\n|---|---|---|");
    for (l, q) in leaderboard.iter().take(15) {
        eprintln!("| {l} | {:.1}% | {:.1}% |", q.fpr * 100.0, q.auroc * 100.0);
    }
    // The chosen detector as the server runs it.
    let mut used: Vec<usize> = Vec::new();
    let mut remap = |stats: Option<usize>| -> Option<usize> {
        let i = stats?;
        Some(match used.iter().position(|u| *u == i) {
            Some(j) => j,
            None => {
                used.push(i);
                used.len() - 1
            }
        })
    };
    let perturbation = choice.perturbation();
    let (method, temperature, epsilon, combination_spec) = match &choice {
        Choice::Single(spec) => {
            remap(spec.stats);
            let (t, e) = match spec.perturbation {
                Some(p) => (p.temperature, p.epsilon),
                None => (spec.temperature, 0.0),
            };
            (spec.method, t, e, None)
        }
        Choice::Pair { a, b, weight } => {
            let [na, nb] = norms.unwrap_or(
                [ScoreNorm {
                    mean: 0.0,
                    std: 1.0,
                    n: 0,
                }; 2],
            );
            let part = |s: &Spec, w: f64, n: ScoreNorm, stats: Option<usize>| PartSpec {
                method: s.method.to_string(),
                temperature: s.temperature,
                perturbed: s.perturbation.is_some(),
                weight: w,
                mean: n.mean,
                std: n.std,
                stats,
            };
            let (sa, sb) = (remap(a.stats), remap(b.stats));
            let spec = CombinationSpec {
                // 1 − 0.9 is 0.09999999999999998 in binary; the grid is in
                // tenths, so the file says 0.1 (a 2e-17 change of the score).
                parts: vec![
                    part(a, *weight, na, sa),
                    part(b, ((1.0 - weight) * 1e9).round() / 1e9, nb, sb),
                ],
            };
            let (t, e) = perturbation.map_or((1.0, 0.0), |p| (p.temperature, p.epsilon));
            (Method::Combined, t, e, Some(spec))
        }
    };
    let fit_stats: Vec<StatsRef> = used
        .iter()
        .map(|&i| {
            let s = &search.stats[i];
            StatsRef {
                file: reference(&paths[i], &args.output),
                sha256: s.sha256.clone(),
                perturbation: s.perturbation(),
            }
        })
        .collect();
    let served_stats: Vec<Arc<LoadedStats>> =
        used.iter().map(|&i| Arc::clone(&search.stats[i])).collect();
    let combination = combination_spec
        .as_ref()
        .map(|spec| spec.combination(temperature, epsilon));
    let scorers = Scorers::new(served_stats, combination, dim);
    let scoring = Scoring {
        method,
        temperature,
        epsilon,
    };
    scorers.check(&scoring)?;
    // δ and the metrics from the serving path's own scores.
    let serve_scores =
        |engine: &mut crate::engine::Engine, set: &Set| -> anyhow::Result<Vec<f32>> {
            let len = set.inputs.len() / set.n;
            let mut out = Vec::with_capacity(set.n);
            for chunk in set.inputs.chunks(128 * len) {
                let n = chunk.len() / len;
                let o = engine.run(chunk, n, scoring.perturbation())?;
                let view = BatchView {
                    n,
                    logits: &o.logits,
                    features: o.features.as_deref(),
                    perturbed_logits: o.perturbed_logits.as_deref(),
                    perturbed_features: o.perturbed_features.as_deref(),
                };
                let mut s = vec![0.0f32; n];
                scorers.score_batch(&scoring, &view, &mut s)?;
                out.extend(s);
            }
            Ok(out)
        };
    let id_scores = serve_scores(&mut engine, &id)?;
    let mut ood_scores = Vec::new();
    for set in &oods {
        ood_scores.extend(serve_scores(&mut engine, set)?);
    }
    let m = metrics::evaluate(&id_scores, &ood_scores, args.tpr);
    let calibration = Calibration {
        method: method.to_string(),
        temperature,
        epsilon,
        threshold: calibrate::threshold(&id_scores, args.tpr),
        tpr: args.tpr,
        model: model.card.name.clone(),
        fit_on: FitData {
            in_distribution: id.description.clone(),
            out_of_distribution: oods.iter().map(|s| s.description.clone()).collect(),
        },
        metrics: Some(PointMetrics {
            fpr_at_tpr: m.fpr_at_tpr,
            detection_error: m.detection_error,
            auroc: m.auroc,
        }),
        selection: format!(
            "calibrate --auto: {} single detectors (ODIN's T × ε grid; msp, maxlogit, energy, gen; knn, vim, mds, rmds, react, fdbd on clean and perturbed frames) and {} weighted pairs of z-scored detectors; lowest FPR at {:.0}% TPR on the pooled OOD tuning images, then highest AUROC: {label}",
            ranked.len(),
            pairs.len(),
            args.tpr * 100.0
        ),
        fit_stats,
        combination: combination_spec,
        leaderboard: leaderboard
            .iter()
            .take(20)
            .map(|(l, q)| Candidate {
                detector: l.clone(),
                fpr_at_tpr: q.fpr,
                auroc: q.auroc,
            })
            .collect(),
    };
    std::fs::write(
        &args.output,
        serde_json::to_string_pretty(&calibration)? + "\n",
    )?;
    eprintln!(
        "\ncalibrated in {:.0} s: {} (T = {}, ε = {}), threshold {} keeps {:.0}% of ID; tuning FPR {:.4}, AUROC {:.4} (serving path); wrote {}",
        started.elapsed().as_secs_f64(),
        calibration.method,
        temperature,
        epsilon,
        calibration.threshold,
        args.tpr * 100.0,
        m.fpr_at_tpr,
        m.auroc,
        args.output.display()
    );
    Ok(std::process::ExitCode::SUCCESS)
}
