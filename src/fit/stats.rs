//! Fit statistics: what the feature-space detectors learn from the training
//! set, and their file format.
//!
//! # File format (version 1)
//!
//! One [safetensors](https://huggingface.co/docs/safetensors) file. Its
//! header metadata has a single key, `odin_sidecar.fit_stats`, whose value is
//! the JSON of [`StatsMeta`] (format name and version, the model's name and
//! sha256, the feature tensor's name, D, K, the training set, N, the bank's
//! sampling, ViM's D_p, which detectors it supports, whether the features were of perturbed images).
//!
//! Tensors (row-major, little-endian; K classes, D feature dimensions):
//!
//! | name | dtype | shape | meaning |
//! |---|---|---|---|
//! | `fc.weight` | F32 | `[K, D]` | final Gemm weight `W` (`z = W·h + b`), as in the model |
//! | `fc.bias` | F32 | `[K]` | final Gemm bias `b` |
//! | `train_mean` | F64 | `[D]` | mean of all N training features (fDBD; RMDS's background mean) |
//! | `class_means` | F64 | `[K, D]` | per-class feature means μ_c (MDS, RMDS) |
//! | `class_counts` | I64 | `[K]` | training frames per class (sums to N) |
//! | `mds.precision` | F64 | `[D, D]` | `pinvh` of the tied within-class covariance |
//! | `rmds.background_precision` | F64 | `[D, D]` | `pinvh` of the whole-train covariance |
//! | `vim.origin` | F64 | `[D]` | `u = −pinv(W)·b` |
//! | `vim.eigenvectors` | F64 | `[D, D]` | eigenvectors of `cov(h − u)` as columns, by descending eigenvalue: the null space of D_p is columns D_p.. |
//! | `vim.eigenvalues` | F64 | `[D]` | eigenvalues of `cov(h − u)`, descending |
//! | `vim.mean_max_logit` | F64 | `[]` | mean over training of `max_c (W·h + b)_c` (α's numerator) |
//! | `vim.mean_residual` | F64 | `[D−1]` | mean over the subsample of `‖(h−u)·NS‖` for D_p = 1..D−1 (α = mean_max_logit / mean_residual[D_p−1]) |
//! | `react.percentiles` | F64 | `[P]` | percentiles p (0–100) fitted for ReAct, ascending |
//! | `react.clip` | F64 | `[P]` | p-th percentile of all training activations |
//! | `knn.bank` | F32 | `[M, D]` | L2-normalised training features (absent when M = 0) |
//!
//! F64 is used for everything the fit computes (a precision matrix rounded to
//! f32 would cost digits in the Mahalanobis distance); the bank is F32 (it is
//! the bulk of the file, and the KNN search re-computes its final distances
//! in f64 anyway).

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The format name in [`StatsMeta::format`].
pub const FORMAT: &str = "odin-sidecar.fit-stats";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The safetensors metadata key holding [`StatsMeta`] as JSON.
pub const META_KEY: &str = "odin_sidecar.fit_stats";

/// Tensor names in the file (see the module docs for their meaning).
pub mod names {
    /// Final Gemm weight.
    pub const FC_WEIGHT: &str = "fc.weight";
    /// Final Gemm bias.
    pub const FC_BIAS: &str = "fc.bias";
    /// Mean training feature.
    pub const TRAIN_MEAN: &str = "train_mean";
    /// Per-class means.
    pub const CLASS_MEANS: &str = "class_means";
    /// Per-class counts.
    pub const CLASS_COUNTS: &str = "class_counts";
    /// Tied precision.
    pub const PRECISION: &str = "mds.precision";
    /// Background precision.
    pub const BACKGROUND_PRECISION: &str = "rmds.background_precision";
    /// ViM origin.
    pub const VIM_ORIGIN: &str = "vim.origin";
    /// ViM eigenvectors.
    pub const VIM_EIGENVECTORS: &str = "vim.eigenvectors";
    /// ViM mean max-logit.
    pub const VIM_MEAN_MAX_LOGIT: &str = "vim.mean_max_logit";
    /// ViM mean residual norm per D_p.
    pub const VIM_MEAN_RESIDUAL: &str = "vim.mean_residual";
    /// ViM eigenvalues.
    pub const VIM_EIGENVALUES: &str = "vim.eigenvalues";
    /// ReAct percentiles.
    pub const REACT_PERCENTILES: &str = "react.percentiles";
    /// ReAct clip values.
    pub const REACT_CLIP: &str = "react.clip";
    /// KNN bank.
    pub const KNN_BANK: &str = "knn.bank";
}

/// The model the statistics were fitted for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Model name (e.g. the card's name).
    pub name: String,
    /// Lower-case hex sha256 of the ONNX file.
    pub sha256: String,
    /// Name of the graph tensor read as the penultimate features.
    pub feature_tensor: String,
}

/// How the KNN bank was drawn from the training stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankInfo {
    /// Rows in the bank (M): `min(N, max_rows)`, or 0 when the fit kept no
    /// bank.
    pub rows: usize,
    /// The cap it was drawn under.
    pub max_rows: usize,
    /// Seed of the reservoir sampler.
    pub seed: u64,
    /// `"all"` when every training frame is in, else `"reservoir"`
    /// (Algorithm R over the stream, SplitMix64).
    pub sampling: String,
}

/// The ODIN perturbation applied to the training images before their
/// features were taken.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitPerturbation {
    /// Temperature of the loss whose gradient gives the direction.
    pub temperature: f32,
    /// Step, in [0, 1] pixel units.
    pub epsilon: f32,
}

/// The JSON header of a statistics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsMeta {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this crate.
    pub version: u32,
    /// The model.
    pub model: ModelInfo,
    /// Free-text description of the training data (path, split, transform).
    pub training_set: String,
    /// Feature dimension D.
    pub dim: usize,
    /// Number of classes K.
    pub num_classes: usize,
    /// Training frames the statistics saw (N).
    pub n_train: u64,
    /// The KNN bank's sampling.
    pub bank: BankInfo,
    /// ViM's default principal-subspace dimension D_p (any D_p in 1..D can
    /// be asked for at scoring time;
    /// columns).
    pub vim_dim: usize,
    /// Relative eigenvalue cutoff of the precision pseudo-inverses.
    pub precision_rtol: f64,
    /// The reservoir rows that ViM's α and ReAct's percentiles were computed
    /// over (all N when `bank.sampling == "all"`).
    pub subsample_rows: usize,
    /// Detectors these statistics can build.
    pub supports: Vec<String>,
    /// The input perturbation the training features were computed under
    /// (ODIN's step at this T and ε), or `None` for the clean images. A
    /// detector scored on perturbed frames can use statistics of training
    /// features perturbed the same way (e.g. a KNN bank of perturbed
    /// training features).
    #[serde(default)]
    pub perturbation: Option<FitPerturbation>,
    /// Writer, e.g. `detectors 0.1.0`.
    pub created_by: String,
}

/// Everything the feature-space detectors need, fitted on a training set.
/// See the module docs for each field's tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Header.
    pub meta: StatsMeta,
    /// `W`, K × D.
    pub fc_weight: Vec<f32>,
    /// `b`, K.
    pub fc_bias: Vec<f32>,
    /// Mean training feature, D.
    pub train_mean: Vec<f64>,
    /// Class means, K × D.
    pub class_means: Vec<f64>,
    /// Training frames per class, K.
    pub class_counts: Vec<i64>,
    /// Tied within-class precision, D × D.
    pub precision: Vec<f64>,
    /// Whole-train precision, D × D.
    pub background_precision: Vec<f64>,
    /// ViM origin `u`, D.
    pub vim_origin: Vec<f64>,
    /// ViM eigenvectors as columns, D × D, by descending eigenvalue.
    pub vim_eigenvectors: Vec<f64>,
    /// Mean training max-logit (ViM α's numerator).
    pub vim_mean_max_logit: f64,
    /// Mean residual norm for D_p = 1..D−1 (index D_p − 1).
    pub vim_mean_residual: Vec<f64>,
    /// Eigenvalues of ViM's covariance, D, descending.
    pub vim_eigenvalues: Vec<f64>,
    /// ReAct percentiles, ascending.
    pub react_percentiles: Vec<f64>,
    /// ReAct clip value per percentile.
    pub react_clip: Vec<f64>,
    /// Normalised bank, M × D (empty when M = 0).
    pub knn_bank: Vec<f32>,
}

/// A problem reading, writing or validating a statistics file.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a well-formed safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Format(String),
    /// A safetensors file without our metadata key.
    #[error("not an odin-sidecar fit statistics file: no `{META_KEY}` metadata")]
    NotStats,
    /// The metadata JSON does not parse.
    #[error("bad `{META_KEY}` metadata: {0}")]
    Metadata(String),
    /// Wrong format name or version.
    #[error("unsupported statistics format {format:?} version {found} (this build reads {FORMAT:?} version {expected})")]
    Version {
        /// Format name found.
        format: String,
        /// Version found.
        found: u32,
        /// Version supported.
        expected: u32,
    },
    /// A tensor is missing.
    #[error("tensor `{0}` is missing")]
    MissingTensor(&'static str),
    /// A tensor has the wrong dtype.
    #[error("tensor `{name}` is {found}, expected {expected}")]
    Dtype {
        /// Tensor.
        name: &'static str,
        /// Dtype expected.
        expected: String,
        /// Dtype found.
        found: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// Tensor.
        name: &'static str,
        /// Shape expected from the metadata's D, K, D_p, M.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor holds NaN or infinity.
    #[error("tensor `{name}` has a non-finite value at flat index {index}")]
    NonFinite {
        /// Tensor.
        name: &'static str,
        /// Flat index of the first bad value.
        index: usize,
    },
    /// A value is out of its valid range.
    #[error("{name}: {reason}")]
    Invalid {
        /// Tensor or metadata field.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The statistics were fitted for another model.
    #[error("statistics were fitted for model {stats_model:?} (sha256 {stats_sha256}), not for the model with sha256 {model_sha256}")]
    ModelMismatch {
        /// Model name in the statistics.
        stats_model: String,
        /// Its sha256.
        stats_sha256: String,
        /// sha256 of the model being served.
        model_sha256: String,
    },
}

/// An owned tensor for serialization.
struct Owned {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Owned {
    fn f32(shape: Vec<usize>, v: &[f32]) -> Self {
        Self {
            dtype: Dtype::F32,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn f64(shape: Vec<usize>, v: &[f64]) -> Self {
        Self {
            dtype: Dtype::F64,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn i64(shape: Vec<usize>, v: &[i64]) -> Self {
        Self {
            dtype: Dtype::I64,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

impl Stats {
    /// D.
    pub fn dim(&self) -> usize {
        self.meta.dim
    }

    /// K.
    pub fn num_classes(&self) -> usize {
        self.meta.num_classes
    }

    /// Rows in the KNN bank (M).
    pub fn bank_rows(&self) -> usize {
        self.meta.bank.rows
    }

    /// The clip value fitted for ReAct percentile `p`, if it was fitted.
    pub fn react_clip_at(&self, p: f64) -> Option<f64> {
        self.react_percentiles
            .iter()
            .position(|q| (q - p).abs() < 1e-9)
            .map(|i| self.react_clip[i])
    }

    /// Fails unless these statistics were fitted for the model whose file
    /// has this sha256 (hex, any case).
    pub fn check_model(&self, model_sha256: &str) -> Result<(), StatsError> {
        if self.meta.model.sha256.eq_ignore_ascii_case(model_sha256) {
            Ok(())
        } else {
            Err(StatsError::ModelMismatch {
                stats_model: self.meta.model.name.clone(),
                stats_sha256: self.meta.model.sha256.clone(),
                model_sha256: model_sha256.to_string(),
            })
        }
    }

    /// Serializes to the bytes of a statistics file (after [`Stats::validate`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>, StatsError> {
        self.validate()?;
        let (k, d) = (self.meta.num_classes, self.meta.dim);
        let p = self.react_percentiles.len();
        let mut tensors: Vec<(&str, Owned)> = vec![
            (names::FC_WEIGHT, Owned::f32(vec![k, d], &self.fc_weight)),
            (names::FC_BIAS, Owned::f32(vec![k], &self.fc_bias)),
            (names::TRAIN_MEAN, Owned::f64(vec![d], &self.train_mean)),
            (
                names::CLASS_MEANS,
                Owned::f64(vec![k, d], &self.class_means),
            ),
            (names::CLASS_COUNTS, Owned::i64(vec![k], &self.class_counts)),
            (names::PRECISION, Owned::f64(vec![d, d], &self.precision)),
            (
                names::BACKGROUND_PRECISION,
                Owned::f64(vec![d, d], &self.background_precision),
            ),
            (names::VIM_ORIGIN, Owned::f64(vec![d], &self.vim_origin)),
            (
                names::VIM_EIGENVECTORS,
                Owned::f64(vec![d, d], &self.vim_eigenvectors),
            ),
            (
                names::VIM_MEAN_MAX_LOGIT,
                Owned::f64(vec![], &[self.vim_mean_max_logit]),
            ),
            (
                names::VIM_MEAN_RESIDUAL,
                Owned::f64(vec![d - 1], &self.vim_mean_residual),
            ),
            (
                names::VIM_EIGENVALUES,
                Owned::f64(vec![d], &self.vim_eigenvalues),
            ),
            (
                names::REACT_PERCENTILES,
                Owned::f64(vec![p], &self.react_percentiles),
            ),
            (names::REACT_CLIP, Owned::f64(vec![p], &self.react_clip)),
        ];
        if self.meta.bank.rows > 0 {
            tensors.push((
                names::KNN_BANK,
                Owned::f32(vec![self.meta.bank.rows, d], &self.knn_bank),
            ));
        }
        let meta =
            serde_json::to_string(&self.meta).map_err(|e| StatsError::Metadata(e.to_string()))?;
        let header = std::collections::HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::serialize(tensors.iter().map(|(n, t)| (*n, t)), Some(header))
            .map_err(|e| StatsError::Format(e.to_string()))
    }

    /// Writes the file atomically (to `path.tmp`, then renamed over `path`).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), StatsError> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let io = |source| StatsError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and validates a statistics file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, StatsError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| StatsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parses and validates the bytes of a statistics file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StatsError> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| StatsError::Format(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| StatsError::Format(e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or(StatsError::NotStats)?;
        // Check format and version before the full schema, so that a newer
        // file says "version 2" rather than "missing field x".
        let probe: serde_json::Value =
            serde_json::from_str(json).map_err(|e| StatsError::Metadata(e.to_string()))?;
        let format = probe.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let version = probe
            .get("version")
            .and_then(|v| v.as_u64())
            .map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
        if format != FORMAT || version != FORMAT_VERSION {
            return Err(StatsError::Version {
                format: format.to_string(),
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let meta: StatsMeta =
            serde_json::from_value(probe).map_err(|e| StatsError::Metadata(e.to_string()))?;
        let (k, d) = (meta.num_classes, meta.dim);
        if d == 0 || k == 0 {
            return Err(StatsError::Invalid {
                name: "metadata",
                reason: format!("dim = {d}, num_classes = {k}: both must be positive"),
            });
        }
        if meta.vim_dim == 0 || meta.vim_dim >= d {
            return Err(StatsError::Invalid {
                name: "vim_dim",
                reason: format!("{} is not in 1..{d}", meta.vim_dim),
            });
        }
        let m = meta.bank.rows;
        let p = tensor(&st, names::REACT_PERCENTILES, Dtype::F64)?
            .shape()
            .to_vec();
        let p = match p.as_slice() {
            [p] => *p,
            _ => {
                return Err(StatsError::Shape {
                    name: names::REACT_PERCENTILES,
                    expected: vec![0],
                    found: p,
                })
            }
        };
        let stats = Stats {
            fc_weight: read_f32(&st, names::FC_WEIGHT, &[k, d])?,
            fc_bias: read_f32(&st, names::FC_BIAS, &[k])?,
            train_mean: read_f64(&st, names::TRAIN_MEAN, &[d])?,
            class_means: read_f64(&st, names::CLASS_MEANS, &[k, d])?,
            class_counts: read_i64(&st, names::CLASS_COUNTS, &[k])?,
            precision: read_f64(&st, names::PRECISION, &[d, d])?,
            background_precision: read_f64(&st, names::BACKGROUND_PRECISION, &[d, d])?,
            vim_origin: read_f64(&st, names::VIM_ORIGIN, &[d])?,
            vim_eigenvectors: read_f64(&st, names::VIM_EIGENVECTORS, &[d, d])?,
            vim_mean_max_logit: read_f64(&st, names::VIM_MEAN_MAX_LOGIT, &[])?[0],
            vim_mean_residual: read_f64(&st, names::VIM_MEAN_RESIDUAL, &[d - 1])?,
            vim_eigenvalues: read_f64(&st, names::VIM_EIGENVALUES, &[d])?,
            react_percentiles: read_f64(&st, names::REACT_PERCENTILES, &[p])?,
            react_clip: read_f64(&st, names::REACT_CLIP, &[p])?,
            knn_bank: if m > 0 {
                read_f32(&st, names::KNN_BANK, &[m, d])?
            } else {
                Vec::new()
            },
            meta,
        };
        stats.validate()?;
        Ok(stats)
    }

    /// Checks lengths against the metadata, finiteness, and value ranges.
    pub fn validate(&self) -> Result<(), StatsError> {
        let meta = &self.meta;
        let (k, d) = (meta.num_classes, meta.dim);
        if meta.format != FORMAT || meta.version != FORMAT_VERSION {
            return Err(StatsError::Version {
                format: meta.format.clone(),
                found: meta.version,
                expected: FORMAT_VERSION,
            });
        }
        if d == 0 || k == 0 || meta.vim_dim == 0 || meta.vim_dim >= d {
            return Err(StatsError::Invalid {
                name: "metadata",
                reason: format!("dim = {d}, num_classes = {k}, vim_dim = {}", meta.vim_dim),
            });
        }
        let m = meta.bank.rows;
        let p = self.react_percentiles.len();
        let lens: [(&'static str, usize, usize); 15] = [
            (names::FC_WEIGHT, self.fc_weight.len(), k * d),
            (names::FC_BIAS, self.fc_bias.len(), k),
            (names::TRAIN_MEAN, self.train_mean.len(), d),
            (names::CLASS_MEANS, self.class_means.len(), k * d),
            (names::CLASS_COUNTS, self.class_counts.len(), k),
            (names::PRECISION, self.precision.len(), d * d),
            (
                names::BACKGROUND_PRECISION,
                self.background_precision.len(),
                d * d,
            ),
            (names::VIM_ORIGIN, self.vim_origin.len(), d),
            (names::VIM_EIGENVECTORS, self.vim_eigenvectors.len(), d * d),
            (
                names::VIM_MEAN_RESIDUAL,
                self.vim_mean_residual.len(),
                d - 1,
            ),
            (names::VIM_EIGENVALUES, self.vim_eigenvalues.len(), d),
            (names::REACT_PERCENTILES, p, p),
            (names::REACT_CLIP, self.react_clip.len(), p),
            (names::KNN_BANK, self.knn_bank.len(), m * d),
            (names::VIM_MEAN_MAX_LOGIT, 1, 1),
        ];
        for (name, found, expected) in lens {
            if found != expected {
                return Err(StatsError::Shape {
                    name,
                    expected: vec![expected],
                    found: vec![found],
                });
            }
        }
        finite32(names::FC_WEIGHT, &self.fc_weight)?;
        finite32(names::FC_BIAS, &self.fc_bias)?;
        finite32(names::KNN_BANK, &self.knn_bank)?;
        for (name, v) in [
            (names::TRAIN_MEAN, &self.train_mean),
            (names::CLASS_MEANS, &self.class_means),
            (names::PRECISION, &self.precision),
            (names::BACKGROUND_PRECISION, &self.background_precision),
            (names::VIM_ORIGIN, &self.vim_origin),
            (names::VIM_EIGENVECTORS, &self.vim_eigenvectors),
            (names::VIM_MEAN_RESIDUAL, &self.vim_mean_residual),
            (names::VIM_EIGENVALUES, &self.vim_eigenvalues),
            (names::REACT_PERCENTILES, &self.react_percentiles),
            (names::REACT_CLIP, &self.react_clip),
        ] {
            finite64(name, v)?;
        }
        if !self.vim_mean_max_logit.is_finite() {
            return Err(StatsError::NonFinite {
                name: names::VIM_MEAN_MAX_LOGIT,
                index: 0,
            });
        }
        if let Some(i) = self.vim_mean_residual.iter().position(|r| *r <= 0.0) {
            return Err(StatsError::Invalid {
                name: names::VIM_MEAN_RESIDUAL,
                reason: format!(
                    "the mean residual for D_p = {} is {}: α would be infinite",
                    i + 1,
                    self.vim_mean_residual[i]
                ),
            });
        }
        if let Some(c) = self.class_counts.iter().position(|&c| c <= 0) {
            return Err(StatsError::Invalid {
                name: names::CLASS_COUNTS,
                reason: format!("class {c} has {} training frames", self.class_counts[c]),
            });
        }
        let total: i64 = self.class_counts.iter().sum();
        if u64::try_from(total).ok() != Some(meta.n_train) {
            return Err(StatsError::Invalid {
                name: names::CLASS_COUNTS,
                reason: format!(
                    "counts sum to {total}, metadata says n_train = {}",
                    meta.n_train
                ),
            });
        }
        for (name, mat) in [
            (names::PRECISION, &self.precision),
            (names::BACKGROUND_PRECISION, &self.background_precision),
        ] {
            let scale = mat.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for i in 0..d {
                for j in i + 1..d {
                    let (a, b) = (mat[i * d + j], mat[j * d + i]);
                    if (a - b).abs() > 1e-9 * scale {
                        return Err(StatsError::Invalid {
                            name,
                            reason: format!("not symmetric at [{i}, {j}]: {a} vs {b}"),
                        });
                    }
                }
                if mat[i * d + i] < 0.0 {
                    return Err(StatsError::Invalid {
                        name,
                        reason: format!("negative diagonal at [{i}, {i}]"),
                    });
                }
            }
        }
        if let Some(i) = self
            .react_percentiles
            .iter()
            .position(|p| !(*p > 0.0 && *p <= 100.0))
        {
            return Err(StatsError::Invalid {
                name: names::REACT_PERCENTILES,
                reason: format!("{} is not in (0, 100]", self.react_percentiles[i]),
            });
        }
        for i in 1..p {
            if self.react_percentiles[i] <= self.react_percentiles[i - 1]
                || self.react_clip[i] < self.react_clip[i - 1]
            {
                return Err(StatsError::Invalid {
                    name: names::REACT_CLIP,
                    reason: "percentiles must increase and clip values must not decrease".into(),
                });
            }
        }
        if m > meta.bank.max_rows
            || m as u64 > meta.n_train
            || meta.subsample_rows as u64 > meta.n_train
        {
            return Err(StatsError::Invalid {
                name: names::KNN_BANK,
                reason: format!(
                    "{m} rows, more than max_rows = {} or n_train = {}",
                    meta.bank.max_rows, meta.n_train
                ),
            });
        }
        for (r, row) in self.knn_bank.chunks_exact(d).enumerate() {
            let norm2: f64 = row.iter().map(|v| f64::from(*v).powi(2)).sum();
            if norm2 != 0.0 && (norm2 - 1.0).abs() > 1e-4 {
                return Err(StatsError::Invalid {
                    name: names::KNN_BANK,
                    reason: format!("row {r} has squared norm {norm2}, expected 1 (or 0)"),
                });
            }
        }
        Ok(())
    }
}

fn tensor<'a>(
    st: &'a SafeTensors<'a>,
    name: &'static str,
    dtype: Dtype,
) -> Result<TensorView<'a>, StatsError> {
    let t = st
        .tensor(name)
        .map_err(|_| StatsError::MissingTensor(name))?;
    if t.dtype() != dtype {
        return Err(StatsError::Dtype {
            name,
            expected: format!("{dtype:?}"),
            found: format!("{:?}", t.dtype()),
        });
    }
    Ok(t)
}

fn shaped<'a>(
    st: &'a SafeTensors<'a>,
    name: &'static str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], StatsError> {
    let t = tensor(st, name, dtype)?;
    if t.shape() != shape {
        return Err(StatsError::Shape {
            name,
            expected: shape.to_vec(),
            found: t.shape().to_vec(),
        });
    }
    Ok(t.data())
}

fn read_f32(
    st: &SafeTensors<'_>,
    name: &'static str,
    shape: &[usize],
) -> Result<Vec<f32>, StatsError> {
    let data = shaped(st, name, Dtype::F32, shape)?;
    let v: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    finite32(name, &v)?;
    Ok(v)
}

fn read_f64(
    st: &SafeTensors<'_>,
    name: &'static str,
    shape: &[usize],
) -> Result<Vec<f64>, StatsError> {
    let data = shaped(st, name, Dtype::F64, shape)?;
    let v: Vec<f64> = data
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    finite64(name, &v)?;
    Ok(v)
}

fn read_i64(
    st: &SafeTensors<'_>,
    name: &'static str,
    shape: &[usize],
) -> Result<Vec<i64>, StatsError> {
    let data = shaped(st, name, Dtype::I64, shape)?;
    Ok(data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

fn finite32(name: &'static str, v: &[f32]) -> Result<(), StatsError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(StatsError::NonFinite { name, index }),
        None => Ok(()),
    }
}

fn finite64(name: &'static str, v: &[f64]) -> Result<(), StatsError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(StatsError::NonFinite { name, index }),
        None => Ok(()),
    }
}
