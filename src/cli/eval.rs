//! `odin-sidecar eval`: score an in-distribution set and OOD sets under
//! every method side by side and report FPR at 95% TPR, detection error,
//! AUROC, AUPR-in and AUPR-out, as markdown tables (per OOD set, and one
//! summary with the mean FPR), JSON, and one ROC plot (SVG) per OOD set.
//!
//! Each set runs through the engine once per distinct perturbation the
//! methods ask for (one fused run gives the clean and perturbed logits and
//! features), and every method is scored from those outputs by the same
//! scorers the server uses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::calibrate_auto::load_stats;
use super::ModelArgs;
use crate::app::Offline;
use crate::calib::calibrate::Calibration;
use crate::calib::metrics::{self, Metrics};
use crate::calib::plot::{self, Curve};
use crate::calib::scores;
use crate::calib::sets::{Set, SetSource};
use crate::engine::{BatchOutput, Engine};
use crate::score::{BatchView, LoadedStats, Method, Perturbation, Scorers, Scoring};

/// Flags of `eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// In-distribution test images: a raw set NAME.u8, a packed set
    /// NAME.jpgpack or a folder of JPEG/PNG. With labels (NAME.labels.u8) the
    /// report also gives the classifier's accuracy on them.
    #[arg(long)]
    pub id: String,
    /// Out-of-distribution sets (repeatable): raw set, packed set, folder,
    /// `uniform[:N[:SEED]]`, `gaussian[:N[:SEED]]`.
    #[arg(long, required = true)]
    pub ood: Vec<String>,
    /// Methods to compare (repeatable): a method name with its
    /// hyper-parameters (`msp`, `maxlogit`, `energy`, `gen`, `knn(k=10)`,
    /// `vim`, `mds`, `rmds`, `react(p=90)`, `fdbd`), optionally on the
    /// perturbed frames as `METHOD@T:EPS` (`odin@1000:0.0014`, also written
    /// `odin:1000:0.0014`), or `calibrated` (from --calibration). Default:
    /// msp, odin:1000:0.0014, energy, maxlogit, gen, and with fit statistics
    /// knn, vim, mds, rmds, react, fdbd.
    #[arg(long = "method-spec")]
    pub methods: Vec<String>,
    /// Images at the start of every set left out of the report: the tuning
    /// images (the paper tunes on the first 1,000).
    #[arg(long, default_value_t = 1000)]
    pub skip: usize,
    /// Report on at most this many images per set after the skipped ones.
    #[arg(long)]
    pub limit: Option<usize>,
    /// True-positive rate for the FPR column.
    #[arg(long, default_value_t = 0.95)]
    pub tpr: f64,
    /// Folder for eval.md, eval.json and roc-<set>.svg.
    #[arg(long, default_value = "eval-results")]
    pub out_dir: PathBuf,
    /// The model, and `--calibration FILE`, which adds the `calibrated` method.
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One method to evaluate.
#[derive(Debug, Clone)]
struct Spec {
    label: String,
    scoring: Scoring,
    /// Which scorers: 0 the --fit-stats ones, 1 the calibration's.
    scorers: usize,
}

fn parse_spec(spec: &str, calibration: Option<&Calibration>) -> anyhow::Result<Spec> {
    if spec == "calibrated" {
        let c =
            calibration.ok_or_else(|| anyhow::anyhow!("`calibrated` needs --calibration FILE"))?;
        let method = c.method();
        let label = match method {
            Method::Combined => format!(
                "calibrated: {}",
                c.combination()
                    .map(|comb| comb.describe())
                    .unwrap_or_default()
            ),
            Method::Odin => format!("calibrated: odin T={} ε={}", c.temperature, c.epsilon),
            m if c.epsilon > 0.0 && m.perturbs() => format!(
                "calibrated: {m} on perturbed (T={}, ε={})",
                c.temperature, c.epsilon
            ),
            m => format!("calibrated: {m}"),
        };
        return Ok(Spec {
            label,
            scoring: Scoring {
                method,
                temperature: c.temperature,
                epsilon: c.epsilon,
            },
            scorers: 1,
        });
    }
    // `odin:T:EPS` (the old form), else `METHOD[@T:EPS]`.
    let (method, at) = match spec.strip_prefix("odin:") {
        Some(rest) => ("odin", Some(rest)),
        None => match spec.rsplit_once('@') {
            Some((m, at)) => (m, Some(at)),
            None => (spec, None),
        },
    };
    let method: Method = method.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    anyhow::ensure!(
        method != Method::Combined,
        "`combined` comes from a calibration: use `calibrated`"
    );
    let (temperature, epsilon) = match at {
        Some(at) => {
            let (t, e) = at
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("{spec:?}: expected METHOD@T:EPS"))?;
            (t.parse::<f32>()?, e.parse::<f32>()?)
        }
        None => (1.0, 0.0),
    };
    anyhow::ensure!(
        temperature > 0.0 && epsilon >= 0.0,
        "{spec:?}: T must be > 0 and ε >= 0"
    );
    let scoring = Scoring {
        method,
        temperature,
        epsilon,
    };
    let label = match (method, scoring.perturbation()) {
        (Method::Odin, _) => format!("odin (T={temperature}, ε={epsilon})"),
        (Method::Msp | Method::Energy, None) if temperature != 1.0 => {
            format!("{method} (T={temperature})")
        }
        (m, Some(p)) => format!("{m} on perturbed (T={}, ε={})", p.temperature, p.epsilon),
        (m, None) => m.to_string(),
    };
    Ok(Spec {
        label,
        scoring,
        scorers: 0,
    })
}

/// Runs `eval`.
pub async fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || evaluate(&args)).await?
}

/// A set's engine outputs under one perturbation.
struct Outputs {
    n: usize,
    logits: Vec<f32>,
    features: Option<Vec<f32>>,
    perturbed_logits: Option<Vec<f32>>,
    perturbed_features: Option<Vec<f32>>,
}

impl Outputs {
    fn run(engine: &mut Engine, set: &Set, p: Option<Perturbation>) -> anyhow::Result<Self> {
        let len = set.inputs.len() / set.n;
        let mut all = Outputs {
            n: set.n,
            logits: Vec::new(),
            features: None,
            perturbed_logits: None,
            perturbed_features: None,
        };
        let extend = |dst: &mut Option<Vec<f32>>, src: Option<Vec<f32>>| {
            if let Some(src) = src {
                dst.get_or_insert_with(Vec::new).extend(src);
            }
        };
        for chunk in set.inputs.chunks(128 * len) {
            let n = chunk.len() / len;
            let BatchOutput {
                logits,
                features,
                perturbed_logits,
                perturbed_features,
                ..
            } = engine.run(chunk, n, p)?;
            all.logits.extend(logits);
            extend(&mut all.features, features);
            extend(&mut all.perturbed_logits, perturbed_logits);
            extend(&mut all.perturbed_features, perturbed_features);
        }
        Ok(all)
    }

    /// Scores every frame under `scoring`, 256 frames per call.
    fn score(&self, scorers: &Scorers, scoring: &Scoring) -> anyhow::Result<Vec<f32>> {
        const CHUNK: usize = 256;
        let n = self.n;
        fn rows(v: &[f32], n: usize, a: usize, b: usize) -> &[f32] {
            let w = v.len() / n;
            &v[a * w..b * w]
        }
        let mut out = vec![0.0f32; n];
        for a in (0..n).step_by(CHUNK) {
            let b = (a + CHUNK).min(n);
            let view = BatchView {
                n: b - a,
                logits: rows(&self.logits, n, a, b),
                features: self.features.as_deref().map(|v| rows(v, n, a, b)),
                perturbed_logits: self.perturbed_logits.as_deref().map(|v| rows(v, n, a, b)),
                perturbed_features: self.perturbed_features.as_deref().map(|v| rows(v, n, a, b)),
            };
            scorers.score_batch(scoring, &view, &mut out[a..b])?;
        }
        Ok(out)
    }
}

fn evaluate(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let calibration = args
        .model
        .calibration
        .as_deref()
        .map(Calibration::load)
        .transpose()?;
    let config = args.model.config()?;
    let Offline {
        model,
        mut engine,
        preprocessor: pre,
        ..
    } = Offline::load(&config)?;
    let model_sha = crate::model::sha256_hex(&model.onnx);
    let dim = engine.feature_dim();
    let stats: Vec<Arc<LoadedStats>> = config
        .fit_stats
        .iter()
        .map(|p| load_stats(p, &model_sha))
        .collect::<anyhow::Result<_>>()?;
    let mut scorer_sets = vec![Scorers::new(stats.clone(), None, dim)];
    if let (Some(c), Some(path)) = (&calibration, &args.model.calibration) {
        let folder = path.parent().map(PathBuf::from).unwrap_or_default();
        let own = c
            .fit_stats
            .iter()
            .map(|r| {
                let loaded = load_stats(&folder.join(&r.file), &model_sha)?;
                anyhow::ensure!(
                    loaded.sha256.eq_ignore_ascii_case(&r.sha256),
                    "{}: SHA-256 {} differs from the calibration's {}",
                    r.file,
                    loaded.sha256,
                    r.sha256
                );
                Ok(loaded)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        scorer_sets.push(Scorers::new(own, c.combination(), dim));
    }
    let mut names: Vec<String> = args.methods.clone();
    if names.is_empty() {
        names = ["msp", "odin:1000:0.0014", "energy", "maxlogit", "gen"]
            .map(String::from)
            .to_vec();
        if !stats.is_empty() {
            names.extend(["knn", "vim", "mds", "rmds", "react", "fdbd"].map(String::from));
        }
    }
    if calibration.is_some() && !names.iter().any(|m| m == "calibrated") {
        names.push("calibrated".into());
    }
    let specs = names
        .iter()
        .map(|s| parse_spec(s, calibration.as_ref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for spec in &specs {
        scorer_sets[spec.scorers]
            .check(&spec.scoring)
            .map_err(|e| anyhow::anyhow!("{}: {e}", spec.label))?;
    }
    let started = std::time::Instant::now();
    let id = Set::load(&SetSource::parse(&args.id), &pre, args.skip, args.limit)?;
    let oods = args
        .ood
        .iter()
        .map(|s| Set::load(&SetSource::parse(s), &pre, args.skip, args.limit))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "loaded {} images in {:.1} s ({} decode, resize {})",
        id.n + oods.iter().map(|s| s.n).sum::<usize>(),
        started.elapsed().as_secs_f64(),
        pre.path().as_str(),
        pre.resize().as_str()
    );
    let accuracy = scores::accuracy(&mut engine, &id)?;

    // One engine pass per set and distinct perturbation.
    let mut keys: Vec<Option<Perturbation>> = vec![None];
    for spec in &specs {
        let p = spec.scoring.perturbation();
        if !keys
            .iter()
            .any(|k| k.map(|k| k.key()) == p.map(|p| p.key()))
        {
            keys.push(p);
        }
    }
    let sets: Vec<&Set> = std::iter::once(&id).chain(oods.iter()).collect();
    let mut scores: HashMap<(usize, usize), Vec<f32>> = HashMap::new(); // (spec, set)
    for p in &keys {
        eprintln!(
            "running {} images {}",
            sets.iter().map(|s| s.n).sum::<usize>(),
            p.map_or("as sent".to_string(), |p| format!(
                "perturbed at T = {}, ε = {}",
                p.temperature, p.epsilon
            ))
        );
        for (si, set) in sets.iter().enumerate() {
            let outputs = Outputs::run(&mut engine, set, *p)?;
            for (i, spec) in specs.iter().enumerate() {
                if spec.scoring.perturbation().map(|q| q.key()) == p.map(|p| p.key()) {
                    let s = outputs.score(&scorer_sets[spec.scorers], &spec.scoring)?;
                    scores.insert((i, si), s);
                }
            }
        }
    }

    let mut rows = Vec::new(); // (ood set, method label, metrics)
    let mut curves: Vec<Vec<Curve>> = vec![Vec::new(); oods.len()];
    for (i, spec) in specs.iter().enumerate() {
        let id_scores = &scores[&(i, 0)];
        for (o, ood) in oods.iter().enumerate() {
            let ood_scores = &scores[&(i, o + 1)];
            rows.push((
                ood.name.clone(),
                spec.label.clone(),
                metrics::evaluate(id_scores, ood_scores, args.tpr),
            ));
            curves[o].push(Curve {
                label: spec.label.clone(),
                points: thin(metrics::roc_points(id_scores, ood_scores)),
            });
        }
    }

    std::fs::create_dir_all(&args.out_dir)?;
    let markdown = table(
        &model.card.name,
        &id,
        accuracy,
        &oods,
        &specs,
        &rows,
        args.tpr,
    );
    std::fs::write(args.out_dir.join("eval.md"), &markdown)?;
    std::fs::write(
        args.out_dir.join("eval.json"),
        serde_json::to_string_pretty(&json(&id, accuracy, &oods, &rows, args, &pre))? + "\n",
    )?;
    for (ood, curves) in oods.iter().zip(&curves) {
        let title = format!(
            "{}: {} (ID) vs {} (OOD)",
            model.card.name, id.name, ood.name
        );
        std::fs::write(
            args.out_dir.join(format!("roc-{}.svg", ood.name)),
            plot::roc_svg(&title, curves),
        )?;
    }
    print!("{markdown}");
    eprintln!(
        "wrote eval.md, eval.json and {} ROC plots to {}",
        oods.len(),
        args.out_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// At most ~500 points per curve: plots stay small, shapes stay exact enough.
fn thin(points: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    let step = (points.len() / 500).max(1);
    let last = points.last().copied();
    let mut out: Vec<(f64, f64)> = points.into_iter().step_by(step).collect();
    if let Some(last) = last {
        if out.last() != Some(&last) {
            out.push(last);
        }
    }
    out
}

fn table(
    model: &str,
    id: &Set,
    accuracy: Option<f64>,
    oods: &[Set],
    specs: &[Spec],
    rows: &[(String, String, Metrics)],
    tpr: f64,
) -> String {
    let pct = tpr * 100.0;
    let accuracy = accuracy.map_or(String::new(), |a| {
        format!(" Classifier accuracy on them: {:.2}%.", a * 100.0)
    });
    let mut md = format!(
        "Model `{model}`, in-distribution: {}.{accuracy}\n\nFPR at {pct:.0}% TPR ↓ / AUROC ↑, per OOD set:\n\n| method |",
        id.description
    );
    for o in oods {
        md += &format!(" {} |", o.name);
    }
    md += " mean FPR ↓ |\n|---|";
    for _ in oods {
        md += "---|";
    }
    md += "---|\n";
    for spec in specs {
        md += &format!("| {} |", spec.label);
        let mut sum = 0.0;
        for o in oods {
            let m = rows
                .iter()
                .find(|(set, label, _)| *set == o.name && *label == spec.label)
                .map(|r| r.2);
            if let Some(m) = m {
                sum += m.fpr_at_tpr;
                md += &format!(" {:.1} / {:.1} |", m.fpr_at_tpr * 100.0, m.auroc * 100.0);
            }
        }
        md += &format!(" {:.1} |\n", sum / oods.len().max(1) as f64 * 100.0);
    }
    md += &format!(
        "\nAll metrics:\n\n| OOD set | method | FPR at {pct:.0}% TPR ↓ | detection error ↓ | AUROC ↑ | AUPR-in ↑ | AUPR-out ↑ |\n|---|---|---|---|---|---|---|\n"
    );
    for (set, label, m) in rows {
        md += &format!(
            "| {set} | {label} | {:.1}% | {:.1}% | {:.1}% | {:.1}% | {:.1}% |\n",
            m.fpr_at_tpr * 100.0,
            m.detection_error * 100.0,
            m.auroc * 100.0,
            m.aupr_in * 100.0,
            m.aupr_out * 100.0
        );
    }
    md += "\nOOD images: ";
    md += &oods
        .iter()
        .map(|s| s.description.clone())
        .collect::<Vec<_>>()
        .join("; ");
    md += ".\n";
    md
}

fn json(
    id: &Set,
    accuracy: Option<f64>,
    oods: &[Set],
    rows: &[(String, String, Metrics)],
    args: &EvalArgs,
    pre: &crate::pipeline::Preprocessor,
) -> serde_json::Value {
    serde_json::json!({
        "in_distribution": id.description,
        "accuracy": accuracy,
        "decode": pre.path().as_str(),
        "resize": pre.resize().as_str(),
        "out_of_distribution": oods.iter().map(|s| s.description.clone()).collect::<Vec<_>>(),
        "tpr": args.tpr,
        "skipped_tuning_images_per_set": args.skip,
        "results": rows.iter().map(|(set, label, m)| serde_json::json!({
            "ood": set, "method": label,
            "fpr_at_tpr": m.fpr_at_tpr, "threshold": m.threshold,
            "detection_error": m.detection_error, "auroc": m.auroc,
            "aupr_in": m.aupr_in, "aupr_out": m.aupr_out,
        })).collect::<Vec<_>>(),
    })
}
