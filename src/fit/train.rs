//! Training sets for `fit`, and the fit itself: every training image through
//! the engine (perturbed first when asked), its penultimate features and
//! logits streamed into a [`Fitter`] with its label.
//!
//! A training SET is a raw set `NAME.u8` with `NAME.labels.u8`, a folder
//! with one sub-folder of JPEG/PNG files per class, or the packed JPEG set
//! `NAME.jpgpack` with `NAME.offsets.u64` (n + 1 little-endian offsets) and
//! `NAME.labels.u8`.

use std::path::{Path, PathBuf};

use super::{FitConfig, FitError, FitPerturbation, FitReport, Fitter, Stats, StatsModel};
use crate::dataset::RawSet;
use crate::domain::{ImageInput, RawPixels};
use crate::engine::{Engine, EngineError};
use crate::pipeline::Preprocessor;
use crate::score::{FeatureBatch, Perturbation};

/// Where the training images come from.
#[derive(Debug)]
enum Source {
    Raw(RawSet),
    Folder(Vec<PathBuf>),
    Packed { pack: Vec<u8>, offsets: Vec<u64> },
}

/// A labelled training set, read lazily image by image.
#[derive(Debug)]
pub struct TrainSet {
    source: Source,
    /// Class of each image.
    pub labels: Vec<u32>,
    /// What it is, for the statistics' metadata.
    pub description: String,
}

/// Why a training set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A file could not be read or does not have the expected layout.
    #[error("{0}")]
    Set(String),
    /// An image could not be decoded.
    #[error("training image {index} ({what}): {detail}")]
    Image {
        /// Its index.
        index: usize,
        /// Where it is.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The fit failed.
    #[error(transparent)]
    Fit(#[from] FitError),
    /// The model has no tapped features.
    #[error("the model's penultimate features are not tapped: {0}")]
    NoFeatures(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TrainError> {
    std::fs::read(path).map_err(|e| TrainError::Set(format!("{}: {e}", path.display())))
}

impl TrainSet {
    /// Opens `spec`: a `.u8` raw set, a `.jpgpack`, or a folder of class
    /// folders. `classes` are the model's labels (folders are matched to
    /// them by name when they all match, else taken in name order).
    pub fn open(spec: &Path, classes: &[String]) -> Result<TrainSet, TrainError> {
        if spec.is_dir() {
            return Self::folder(spec, classes);
        }
        let name = spec.display().to_string();
        if spec.extension().and_then(|e| e.to_str()) == Some("jpgpack") {
            let pack = read(spec)?;
            let off_bytes = read(&spec.with_extension("offsets.u64"))?;
            let offsets: Vec<u64> = off_bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            let labels = read(&spec.with_extension("labels.u8"))?;
            let n = labels.len();
            if offsets.len() != n + 1
                || offsets.windows(2).any(|w| w[0] > w[1])
                || offsets.last().copied() != Some(pack.len() as u64)
            {
                return Err(TrainError::Set(format!(
                    "{name}: {} offsets for {n} labels and {} bytes: expected n + 1 increasing offsets ending at the pack's size",
                    offsets.len(),
                    pack.len()
                )));
            }
            return Ok(TrainSet {
                source: Source::Packed { pack, offsets },
                labels: labels.into_iter().map(u32::from).collect(),
                description: format!("{name} ({n} packed JPEG images)"),
            });
        }
        let raw = RawSet::open(spec).map_err(|e| TrainError::Set(e.to_string()))?;
        let labels = raw.labels.clone().ok_or_else(|| {
            TrainError::Set(format!(
                "{name} has no labels ({} is missing)",
                spec.with_extension("labels.u8").display()
            ))
        })?;
        Ok(TrainSet {
            description: format!("{name} ({} raw images)", raw.n),
            source: Source::Raw(raw),
            labels: labels.into_iter().map(u32::from).collect(),
        })
    }

    fn folder(dir: &Path, classes: &[String]) -> Result<TrainSet, TrainError> {
        let io = |e: std::io::Error| TrainError::Set(format!("{}: {e}", dir.display()));
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        if subdirs.is_empty() {
            return Err(TrainError::Set(format!(
                "{}: no class folders (expected DIR/<class>/*.jpg)",
                dir.display()
            )));
        }
        let names: Vec<String> = subdirs
            .iter()
            .map(|p| {
                p.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            })
            .collect();
        let by_label = !classes.is_empty() && names.iter().all(|n| classes.contains(n));
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for (i, (sub, name)) in subdirs.iter().zip(&names).enumerate() {
            let class = if by_label {
                classes.iter().position(|c| c == name).unwrap_or(i)
            } else {
                i
            };
            let mut images: Vec<PathBuf> = std::fs::read_dir(sub)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png")
                    })
                })
                .collect();
            images.sort();
            labels.extend(std::iter::repeat_n(class as u32, images.len()));
            files.extend(images);
        }
        Ok(TrainSet {
            description: format!(
                "{} ({} images in {} class folders, classes {})",
                dir.display(),
                files.len(),
                subdirs.len(),
                if by_label {
                    "by the card's labels"
                } else {
                    "in folder-name order"
                }
            ),
            source: Source::Folder(files),
            labels,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`, decoded to 8-bit pixels (RGB or gray, as stored).
    pub fn image(&self, i: usize) -> Result<RawPixels, TrainError> {
        let decode = |bytes: &[u8], what: String| -> Result<RawPixels, TrainError> {
            let img = image::load_from_memory(bytes).map_err(|e| TrainError::Image {
                index: i,
                what,
                detail: e.to_string(),
            })?;
            let rgb = img.to_rgb8();
            Ok(RawPixels {
                width: rgb.width(),
                height: rgb.height(),
                channels: 3,
                pixels: rgb.into_raw(),
            })
        };
        match &self.source {
            Source::Raw(raw) => Ok(raw.raw(i)),
            Source::Folder(files) => {
                let bytes = read(&files[i])?;
                decode(&bytes, files[i].display().to_string())
            }
            Source::Packed { pack, offsets } => {
                let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
                decode(&pack[a..b], format!("packed entry {i}"))
            }
        }
    }
}

/// `n` indices spread evenly over `0..len` (all of them when `n >= len`),
/// so a subsample of a class-major set keeps every class.
pub fn spread(len: usize, n: Option<usize>) -> Vec<usize> {
    match n {
        Some(n) if n < len => (0..n).map(|i| i * len / n).collect(),
        _ => (0..len).collect(),
    }
}

/// What to fit.
#[derive(Debug, Clone)]
pub struct FitJob {
    /// The fitter's settings (K, D, bank size, seed, ViM D, percentiles).
    pub config: FitConfig,
    /// The model, for the statistics' metadata.
    pub model: StatsModel,
    /// `W` (K × D) and `b` of the final layer.
    pub fc_weight: Vec<f32>,
    /// `b`.
    pub fc_bias: Vec<f32>,
    /// Perturb each training image first (ODIN's step at this T and ε).
    pub perturbation: Option<Perturbation>,
    /// Images per engine run.
    pub batch: usize,
}

/// Runs `set[indices]` through `engine` and fits the statistics. Calls
/// `progress(done)` after each batch and `visit(index, pixels, label)` for
/// each decoded image (for a dump of exactly what was fitted on).
pub fn fit(
    engine: &mut Engine,
    pre: &Preprocessor,
    set: &TrainSet,
    indices: &[usize],
    job: FitJob,
    mut progress: impl FnMut(usize),
    mut visit: impl FnMut(usize, &RawPixels, u32),
) -> Result<(Stats, FitReport), TrainError> {
    let dim = engine
        .feature_dim()
        .ok_or_else(|| TrainError::NoFeatures("no feature taps were found".into()))?;
    let mut config = job.config;
    config.perturbation = job.perturbation.map(|p| FitPerturbation {
        temperature: p.temperature,
        epsilon: p.epsilon,
    });
    let description = match job.perturbation {
        None => set.description.clone(),
        Some(p) => format!(
            "{}, each image perturbed by ODIN at T = {}, ε = {} before its features were taken",
            set.description, p.temperature, p.epsilon
        ),
    };
    let description = if indices.len() < set.len() {
        format!(
            "{description}; {} of the {} images, evenly spread",
            indices.len(),
            set.len()
        )
    } else {
        description
    };
    let mut fitter = Fitter::new(config, job.model, description, &job.fc_weight, &job.fc_bias)?;
    let mut done = 0;
    for chunk in indices.chunks(job.batch.max(1)) {
        let mut input = Vec::with_capacity(chunk.len() * pre.tensor_len());
        let mut labels = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let pixels = set.image(i)?;
            let label = set.labels[i];
            visit(i, &pixels, label);
            let tensor =
                pre.tensor(Some(&ImageInput::Raw(pixels)))
                    .map_err(|e| TrainError::Image {
                        index: i,
                        what: set.description.clone(),
                        detail: e.to_string(),
                    })?;
            input.extend_from_slice(&tensor);
            labels.push(label);
        }
        let n = chunk.len();
        let out = engine.run(&input, n, job.perturbation)?;
        let (logits, features) = match job.perturbation {
            None => (out.logits, out.features),
            Some(_) => (
                out.perturbed_logits.unwrap_or_default(),
                out.perturbed_features,
            ),
        };
        let features = features.ok_or_else(|| TrainError::NoFeatures("no features".into()))?;
        if features.len() != n * dim {
            return Err(TrainError::NoFeatures(format!(
                "{} feature values for {n} images of D = {dim}",
                features.len()
            )));
        }
        fitter.push(
            FeatureBatch {
                logits: &logits,
                features: &features,
                n,
            },
            &labels,
        )?;
        done += n;
        progress(done);
    }
    Ok(fitter.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_keeps_every_class_of_a_class_major_set() {
        assert_eq!(spread(10, Some(5)), vec![0, 2, 4, 6, 8]);
        assert_eq!(spread(3, Some(5)), vec![0, 1, 2]);
        assert_eq!(spread(4, None), vec![0, 1, 2, 3]);
        let picked = spread(50_000, Some(5_000));
        let per_class: Vec<usize> = (0..10)
            .map(|c| picked.iter().filter(|&&i| i / 5000 == c).count())
            .collect();
        assert_eq!(per_class, vec![500; 10]);
    }
}
