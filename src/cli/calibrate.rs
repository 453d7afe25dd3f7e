//! `odin-sidecar calibrate`: fit (T, ε, δ) on validation images and write
//! the calibration file `serve --calibration` loads.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use super::ModelArgs;
use crate::app;
use crate::calib::calibrate::{self, Calibration, FitData, TEMPERATURES};
use crate::calib::scores;
use crate::calib::sets::{Set, SetSource};
use crate::score::{Method, Scoring};

/// Flags of `calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// In-distribution validation images: a raw set NAME.u8 or a folder of JPEG/PNG.
    #[arg(long)]
    pub id: String,
    /// Out-of-distribution validation images (repeatable): a raw set, a
    /// folder, `uniform` or `gaussian`. With them (T, ε) come from the paper's
    /// grid search; without them T = 1000 and ε from the model card.
    #[arg(long)]
    pub ood: Vec<String>,
    /// Images of each set used for tuning: the first N (the paper uses 1,000).
    #[arg(long, default_value_t = 1000)]
    pub tune: usize,
    /// Fraction of in-distribution images to keep at the threshold.
    #[arg(long, default_value_t = 0.95)]
    pub tpr: f64,
    /// Where to write the calibration.
    #[arg(long, short, default_value = "calibration.json")]
    pub output: PathBuf,
    /// Search every detector and its hyper-parameters (ODIN's T × ε grid,
    /// the feature-space detectors with the --fit-stats files on the frames
    /// as sent and perturbed, and weighted pairs of z-scored detectors) and
    /// keep the lowest FPR at --tpr on the pooled OOD tuning images.
    #[arg(long, requires = "ood")]
    pub auto: bool,
    /// With --auto: a labelled training set (as `fit --train`) to fit
    /// statistics of training features perturbed at the best ODIN point,
    /// written beside the calibration, and search the detectors with them too.
    #[arg(long, requires = "auto")]
    pub train: Option<PathBuf>,
    /// With --train: fit on at most this many training images (evenly spread).
    #[arg(long, requires = "train")]
    pub train_limit: Option<usize>,
    /// With --train: rows of the perturbed KNN bank.
    #[arg(long, default_value_t = 50_000)]
    pub bank_rows: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `calibrate`.
pub async fn run(args: CalibrateArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || calibrate(&args)).await?
}

fn calibrate(args: &CalibrateArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.tpr > 0.0 && args.tpr <= 1.0, "--tpr must be in (0, 1]");
    if args.auto {
        return super::calibrate_auto::run(args);
    }
    let config = args.model.config()?;
    let (model, mut engine, pre) = app::offline_engine(&config)?;
    let id = Set::load(&SetSource::parse(&args.id), &pre, 0, Some(args.tune))?;
    let oods = args
        .ood
        .iter()
        .map(|s| Set::load(&SetSource::parse(s), &pre, 0, Some(args.tune)))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let calibration = if oods.is_empty() {
        let scoring = Scoring {
            method: Method::Odin,
            temperature: 1000.0,
            epsilon: model.card.odin.epsilon,
        };
        let id_scores = scores::scores(&mut engine, &id, scoring)?;
        Calibration {
            method: "odin".into(),
            temperature: scoring.temperature,
            epsilon: scoring.epsilon,
            threshold: calibrate::threshold(&id_scores, args.tpr),
            tpr: args.tpr,
            model: model.card.name.clone(),
            fit_on: FitData {
                in_distribution: id.description.clone(),
                out_of_distribution: vec![],
            },
            metrics: None,
            selection: "no OOD validation data: T = 1000 and epsilon from the model card".into(),
            fit_stats: vec![],
            combination: None,
            leaderboard: vec![],
        }
    } else {
        let epsilons = calibrate::epsilons();
        let total = (id.n + oods.iter().map(|s| s.n).sum::<usize>()) * TEMPERATURES.len();
        let mut done = 0;
        let mut progress = |n: usize| {
            done += n;
            progress_line(done, total, started);
        };
        let grid_id = scores::odin_grid(&mut engine, &id, &TEMPERATURES, &epsilons, &mut progress)?;
        // OOD sets are pooled: one (T, ε) must serve whatever the camera sees.
        let mut grid_ood = vec![vec![Vec::new(); epsilons.len()]; TEMPERATURES.len()];
        for set in &oods {
            let grid =
                scores::odin_grid(&mut engine, set, &TEMPERATURES, &epsilons, &mut progress)?;
            for (t, row) in grid.into_iter().enumerate() {
                for (e, s) in row.into_iter().enumerate() {
                    grid_ood[t][e].extend(s);
                }
            }
        }
        eprintln!();
        let (ti, ei, point) =
            calibrate::best_point(&grid_id, &grid_ood, &TEMPERATURES, &epsilons, args.tpr);
        Calibration {
            method: "odin".into(),
            temperature: TEMPERATURES[ti],
            epsilon: epsilons[ei],
            threshold: calibrate::threshold(&grid_id[ti][ei], args.tpr),
            tpr: args.tpr,
            model: model.card.name.clone(),
            fit_on: FitData {
                in_distribution: id.description.clone(),
                out_of_distribution: oods.iter().map(|s| s.description.clone()).collect(),
            },
            metrics: Some(point),
            selection: format!(
                "grid search over T in {TEMPERATURES:?} and 21 epsilon in [0, 0.004]: lowest FPR at {:.0}% TPR",
                args.tpr * 100.0
            ),
            fit_stats: vec![],
            combination: None,
            leaderboard: vec![],
        }
    };
    std::fs::write(
        &args.output,
        serde_json::to_string_pretty(&calibration)? + "\n",
    )?;
    eprintln!(
        "calibrated in {:.1} s: T = {}, epsilon = {}, threshold = {} (keeps {:.0}% of ID){}; wrote {}",
        started.elapsed().as_secs_f64(),
        calibration.temperature,
        calibration.epsilon,
        calibration.threshold,
        args.tpr * 100.0,
        calibration
            .metrics
            .map(|m| format!(", tuning FPR {:.4}, AUROC {:.4}", m.fpr_at_tpr, m.auroc))
            .unwrap_or_default(),
        args.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// A one-line progress bar on stderr.
pub fn progress_line(done: usize, total: usize, started: Instant) {
    progress(done, total, started, "image-passes");
}

/// A one-line progress bar on stderr, counting `unit`, redrawn at most
/// every half second (and at the end).
pub fn progress(done: usize, total: usize, started: Instant, unit: &str) {
    use std::sync::Mutex;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t).as_millis() >= 500);
        if !due && done < total {
            return;
        }
        *last = Some(now);
    }
    let fraction = done as f64 / total.max(1) as f64;
    let width = 30;
    let filled = (fraction * width as f64) as usize;
    let elapsed = started.elapsed().as_secs_f64();
    let eta = if fraction > 0.0 {
        elapsed / fraction - elapsed
    } else {
        0.0
    };
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r[{}{}] {:>5.1}% {done}/{total} {unit}, {elapsed:.0} s, eta {eta:.0} s",
        "#".repeat(filled),
        " ".repeat(width - filled.min(width)),
        fraction * 100.0
    );
    let _ = err.flush();
}
