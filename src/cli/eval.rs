//! `odin-sidecar eval`: score an in-distribution set and OOD sets under
//! several methods and report FPR at 95% TPR, detection error, AUROC,
//! AUPR-in and AUPR-out, as a markdown table, JSON, and one ROC plot (SVG)
//! per OOD set.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::app;
use crate::calib::calibrate::Calibration;
use crate::calib::metrics::{self, Metrics};
use crate::calib::plot::{self, Curve};
use crate::calib::scores;
use crate::calib::sets::{Set, SetSource};
use crate::score::{Method, Scoring};

/// Flags of `eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// In-distribution test images: a raw set NAME.u8, a packed set
    /// NAME.jpgpack or a folder of JPEG/PNG. With labels (NAME.labels.u8) the
    /// report also gives the classifier's accuracy on them.
    #[arg(long)]
    pub id: String,
    /// Out-of-distribution sets (repeatable): raw set, packed set, folder, `uniform[:N]`, `gaussian[:N]`.
    #[arg(long, required = true)]
    pub ood: Vec<String>,
    /// Methods to compare (repeatable): `msp`, `maxlogit`, `energy`,
    /// `odin:T:EPS`, or `calibrated` (from --calibration).
    #[arg(long = "method-spec", default_values_t = ["msp".to_string(), "odin:1000:0.0014".to_string(), "energy".to_string()])]
    pub methods: Vec<String>,
    /// A calibration file; adds the `calibrated` method.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
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
    #[command(flatten)]
    pub model: ModelArgs,
}

/// One method to evaluate.
#[derive(Debug, Clone)]
struct Spec {
    label: String,
    scoring: Scoring,
}

fn parse_spec(spec: &str, calibration: Option<&Calibration>) -> anyhow::Result<Spec> {
    let at = |method, temperature, epsilon| Scoring {
        method,
        temperature,
        epsilon,
    };
    let scoring = match spec.split(':').collect::<Vec<_>>().as_slice() {
        ["msp"] => at(Method::Msp, 1.0, 0.0),
        ["maxlogit"] => at(Method::MaxLogit, 1.0, 0.0),
        ["energy"] => at(Method::Energy, 1.0, 0.0),
        ["odin", t, e] => at(Method::Odin, t.parse()?, e.parse()?),
        ["calibrated"] => {
            let c = calibration
                .ok_or_else(|| anyhow::anyhow!("`calibrated` needs --calibration FILE"))?;
            at(c.method(), c.temperature, c.epsilon)
        }
        _ => anyhow::bail!(
            "unknown method spec {spec:?}: use msp, maxlogit, energy, odin:T:EPS or calibrated"
        ),
    };
    let label = match spec {
        "calibrated" => format!(
            "odin calibrated (T={}, ε={})",
            scoring.temperature, scoring.epsilon
        ),
        _ if scoring.method == Method::Odin => {
            format!("odin (T={}, ε={})", scoring.temperature, scoring.epsilon)
        }
        _ => spec.to_string(),
    };
    Ok(Spec { label, scoring })
}

/// Runs `eval`.
pub async fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || evaluate(&args)).await?
}

fn evaluate(args: &EvalArgs) -> anyhow::Result<ExitCode> {
    let calibration = args
        .calibration
        .as_deref()
        .map(Calibration::load)
        .transpose()?;
    let mut specs = args
        .methods
        .iter()
        .map(|s| parse_spec(s, calibration.as_ref()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if calibration.is_some() && !args.methods.iter().any(|m| m == "calibrated") {
        specs.push(parse_spec("calibrated", calibration.as_ref())?);
    }
    let config = args.model.config()?;
    let (model, mut engine, pre) = app::offline_engine(&config)?;
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

    let mut rows = Vec::new(); // (ood set, method label, metrics)
    let mut curves: Vec<Vec<Curve>> = vec![Vec::new(); oods.len()];
    for spec in &specs {
        eprintln!("scoring {} ...", spec.label);
        let id_scores = scores::scores(&mut engine, &id, spec.scoring)?;
        for (i, ood) in oods.iter().enumerate() {
            let ood_scores = scores::scores(&mut engine, ood, spec.scoring)?;
            rows.push((
                ood.name.clone(),
                spec.label.clone(),
                metrics::evaluate(&id_scores, &ood_scores, args.tpr),
            ));
            curves[i].push(Curve {
                label: spec.label.clone(),
                points: thin(metrics::roc_points(&id_scores, &ood_scores)),
            });
        }
    }

    std::fs::create_dir_all(&args.out_dir)?;
    let markdown = table(&model.card.name, &id, accuracy, &oods, &rows, args.tpr);
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
    rows: &[(String, String, Metrics)],
    tpr: f64,
) -> String {
    let pct = tpr * 100.0;
    let accuracy = accuracy.map_or(String::new(), |a| {
        format!(" Classifier accuracy on them: {:.2}%.", a * 100.0)
    });
    let mut md = format!(
        "Model `{model}`, in-distribution: {}.{accuracy}\n\n| OOD set | method | FPR at {pct:.0}% TPR ↓ | detection error ↓ | AUROC ↑ | AUPR-in ↑ | AUPR-out ↑ |\n|---|---|---|---|---|---|---|\n",
        id.description
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
