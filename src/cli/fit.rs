//! `odin-sidecar fit`: the feature-space detectors' training statistics
//! (KNN bank, class means and covariances, ViM's principal subspace,
//! ReAct's activation percentiles) from a labelled training set, into one
//! versioned safetensors file that `serve`, `calibrate` and `eval` load.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use super::ModelArgs;
use crate::app::Offline;
use crate::fit::train::{self, FitJob, TrainSet};
use crate::fit::{FitConfig, StatsModel, DEFAULT_REACT_PERCENTILES};
use crate::score::Perturbation;

/// Flags of `fit`.
#[derive(Debug, Clone, Args)]
pub struct FitArgs {
    /// Training set: a raw set NAME.u8 with NAME.labels.u8, a packed JPEG set
    /// NAME.jpgpack (with NAME.offsets.u64 and NAME.labels.u8), or a folder
    /// with one sub-folder of images per class.
    #[arg(long)]
    pub train: PathBuf,
    /// Where to write the statistics [default: MODEL stem + `.fit.safetensors`
    /// (`.fit-T{T}-e{ε}.safetensors` when perturbed), in the current folder].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Rows of the KNN bank: a seeded reservoir subsample of the training
    /// features when the set is larger (0: no bank, no knn).
    #[arg(long, default_value_t = 50_000)]
    pub bank_rows: usize,
    /// Fit on at most this many training images, spread evenly over the set
    /// (every class keeps its share).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seed of the bank's reservoir sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ViM's default principal dimension D_p [default: D/2 below D = 768,
    /// as the ViM paper and OpenOOD]; any D_p can still be asked at scoring time.
    #[arg(long)]
    pub vim_dim: Option<usize>,
    /// ReAct percentiles to fit.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_REACT_PERCENTILES.to_vec())]
    pub react_percentiles: Vec<f64>,
    /// Take the features of the ODIN-perturbed training images, at this T
    /// (with --perturb-epsilon): for detectors scored on perturbed frames.
    #[arg(long, requires = "perturb_epsilon")]
    pub perturb_temperature: Option<f32>,
    /// ε of the training images' perturbation.
    #[arg(long, requires = "perturb_temperature")]
    pub perturb_epsilon: Option<f32>,
    /// Images per engine run.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Also write the decoded training pixels fitted on, as a raw set
    /// (FILE.u8 with FILE.json and FILE.labels.u8): what an independent
    /// implementation needs to fit from the same pixels.
    #[arg(long)]
    pub dump_pixels: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `fit`.
pub async fn run(args: FitArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || fit(&args)).await?
}

fn fit(args: &FitArgs) -> anyhow::Result<ExitCode> {
    let config = args.model.config()?;
    let Offline {
        model,
        graphs,
        mut engine,
        preprocessor,
    } = Offline::load(&config)?;
    let taps = graphs.taps.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "the model's penultimate features could not be found (see the log); \
             name them in the card's \"features\" field"
        )
    })?;
    let perturbation = match (args.perturb_temperature, args.perturb_epsilon) {
        (Some(temperature), Some(epsilon)) => {
            anyhow::ensure!(
                temperature > 0.0 && epsilon > 0.0,
                "--perturb-temperature and --perturb-epsilon must be positive"
            );
            anyhow::ensure!(
                engine.can_perturb(),
                "the gradient graph could not be derived for this model"
            );
            Some(Perturbation {
                temperature,
                epsilon,
            })
        }
        _ => None,
    };
    let set = TrainSet::open(&args.train, &model.card.labels)?;
    anyhow::ensure!(!set.is_empty(), "{} has no images", args.train.display());
    let indices = train::spread(set.len(), args.limit);
    let output = args.output.clone().unwrap_or_else(|| {
        let stem = match &args.model.model {
            Some(p) => p
                .file_stem()
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned()),
            None => model.card.name.clone(),
        };
        PathBuf::from(match perturbation {
            None => format!("{stem}.fit.safetensors"),
            Some(p) => format!("{stem}.fit-T{}-e{}.safetensors", p.temperature, p.epsilon),
        })
    });
    let mut fit_config = FitConfig::new(taps.classes, taps.dim);
    fit_config.bank_max_rows = args.bank_rows.max(1);
    fit_config.keep_bank = args.bank_rows > 0;
    fit_config.seed = args.seed;
    fit_config.vim_dim = args.vim_dim;
    fit_config.react_percentiles = args.react_percentiles.clone();
    let job = FitJob {
        config: fit_config,
        model: StatsModel {
            name: model.card.name.clone(),
            sha256: crate::model::sha256_hex(&model.onnx),
            feature_tensor: taps.features.clone(),
        },
        fc_weight: taps.fc_weight.clone(),
        fc_bias: taps.fc_bias.clone(),
        perturbation,
        batch: args.batch,
    };
    eprintln!(
        "fitting {} (features {:?}, D = {}, K = {}) on {} of {}{}",
        model.card.name,
        taps.features,
        taps.dim,
        taps.classes,
        indices.len(),
        set.description,
        perturbation.map_or(String::new(), |p| format!(
            ", perturbed at T = {}, ε = {}",
            p.temperature, p.epsilon
        ))
    );
    let mut dump = match &args.dump_pixels {
        Some(path) => Some((
            std::io::BufWriter::new(std::fs::File::create(path.with_extension("u8"))?),
            Vec::<u8>::new(),
            None::<(u32, u32, u32)>,
            path.clone(),
        )),
        None => None,
    };
    let mut dump_error = None;
    let started = Instant::now();
    let total = indices.len();
    let (stats, report) = train::fit(
        &mut engine,
        &preprocessor,
        &set,
        &indices,
        job,
        |done| super::calibrate::progress(done, total, started, "images"),
        |_, pixels, label| {
            if let Some((file, labels, shape, _)) = dump.as_mut() {
                let this = (pixels.height, pixels.width, pixels.channels);
                if shape.is_some_and(|s| s != this) && dump_error.is_none() {
                    dump_error = Some(format!(
                        "--dump-pixels needs images of one size; found {this:?} after {shape:?}"
                    ));
                }
                *shape = Some(this);
                if let Err(e) = file.write_all(&pixels.pixels) {
                    dump_error.get_or_insert(e.to_string());
                }
                labels.push(label as u8);
            }
        },
    )?;
    eprintln!();
    if let Some(e) = dump_error {
        anyhow::bail!("{e}");
    }
    if let Some((mut file, labels, shape, path)) = dump {
        file.flush()?;
        let (h, w, c) = shape.unwrap_or_default();
        std::fs::write(path.with_extension("labels.u8"), &labels)?;
        std::fs::write(
            path.with_extension("json"),
            serde_json::json!({"n": labels.len(), "h": h, "w": w, "c": c, "dtype": "u8",
                "layout": "NHWC", "has_labels": true,
                "notes": format!("decoded by odin-sidecar fit from {}", set.description)})
            .to_string(),
        )?;
    }
    stats.save(&output)?;
    eprintln!(
        "fitted in {:.1} s: {} training images, train accuracy {:.4}, bank {} rows ({}), \
         ViM D_p = {} (eigengap {:.3}), precision condition {:.3e} ({} eigenvalues dropped), \
         max |logit − (W·h + b)| {:.1e}; wrote {}",
        started.elapsed().as_secs_f64(),
        report.n_train,
        report.train_accuracy,
        stats.bank_rows(),
        stats.meta.bank.sampling,
        stats.meta.vim_dim,
        report.vim_eigengap,
        report.precision_condition,
        report.precision_dropped,
        report.max_logit_error,
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}
