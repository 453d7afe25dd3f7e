//! Fitting the detectors' statistics from a stream of training batches.
//!
//! [`Fitter`] takes batches of (features, logits, labels) and keeps:
//!
//! * exact streaming sums in `f64` for the class means, the tied
//!   within-class scatter and (through it) the whole-train scatter: each
//!   sample is shifted by a per-class reference point (the class's first
//!   sample) before its outer product is added, so the final
//!   `S_w = Σ (x − s_c)(x − s_c)ᵀ − Σ_c n_c d_c d_cᵀ` does not cancel
//!   catastrophically even when the means are large against the spread;
//! * the running sum of the max-logit `max_c (W·h + b)_c` (ViM's numerator,
//!   recomputed from the features as OpenOOD does);
//! * a seeded reservoir (Algorithm R) of at most `bank_max_rows` raw feature
//!   rows: it becomes the KNN bank (normalised), and ViM's mean residual and
//!   ReAct's percentiles are computed over it. While N ≤ `bank_max_rows` the
//!   reservoir is the whole training set in arrival order and every statistic
//!   equals OpenOOD's full-data one.
//!
//! [`Fitter::finish`] then computes precisions, ViM's null space and α,
//! ReAct's clip values and the bank, and returns [`Stats`] and a
//! [`FitReport`] of diagnostics.

use thiserror::Error;

use crate::fit::linalg::{self, LinalgError};
use crate::fit::rng::SplitMix64;
use crate::fit::stats::{
    BankInfo, FitPerturbation, ModelInfo, Stats, StatsMeta, FORMAT, FORMAT_VERSION,
};
use crate::score::{argmax, FeatureBatch};

/// ViM's default principal dimension D_p for feature dimension D, following
/// the ViM paper (Wang et al. 2022, §4.1) and OpenOOD's scripts: 1000 when
/// D ≥ 1500 (ResNet-50's 2048), 512 when D = 768 (ViT-B), else D/2 (OpenOOD
/// runs ViM with dim 256 on CIFAR ResNet-18's D = 512 and dim 42 on LeNet's
/// D = 84). So 32 for ResNet-20's D = 64, 64 for D = 128.
pub fn default_vim_dim(dim: usize) -> usize {
    if dim >= 1500 {
        1000
    } else if dim == 768 {
        512
    } else {
        (dim / 2).max(1)
    }
}

/// OpenOOD's ReAct percentile sweep (`configs/postprocessors/react.yml`,
/// `percentile_list`); 90 is its default.
pub const DEFAULT_REACT_PERCENTILES: [f64; 4] = [85.0, 90.0, 95.0, 99.0];

/// Settings of a fit.
#[derive(Debug, Clone, PartialEq)]
pub struct FitConfig {
    /// Number of classes K.
    pub num_classes: usize,
    /// Feature dimension D.
    pub dim: usize,
    /// Cap on the reservoir subsample of raw training features (≥ 1): it is
    /// the KNN bank, and ViM's α and ReAct's percentiles are computed over
    /// it. Default 50,000 (CIFAR's training set: all of it).
    pub bank_max_rows: usize,
    /// Whether to store the bank in the statistics (false: no `knn`, a
    /// small file).
    pub keep_bank: bool,
    /// Seed of the reservoir sampler.
    pub seed: u64,
    /// ViM's D_p; `None` for [`default_vim_dim`].
    pub vim_dim: Option<usize>,
    /// ReAct percentiles to fit, in (0, 100].
    pub react_percentiles: Vec<f64>,
    /// Relative eigenvalue cutoff of the precision pseudo-inverses; `None`
    /// for `D · ε(f64)` as `scipy.linalg.pinvh` (what OpenOOD gets through
    /// sklearn's `EmpiricalCovariance`).
    pub precision_rtol: Option<f64>,
    /// Largest accepted `|z − (W·h + b)| / (1 + |W·h + b|)` between the
    /// logits given and those recomputed from the features: catches a wrong
    /// feature tensor or a transposed weight. `None` skips the check.
    pub logit_tolerance: Option<f64>,
    /// The perturbation the training features were computed under
    /// (recorded in the statistics), or `None` for clean images.
    pub perturbation: Option<FitPerturbation>,
}

impl FitConfig {
    /// Defaults for K classes and D feature dimensions.
    pub fn new(num_classes: usize, dim: usize) -> Self {
        Self {
            num_classes,
            dim,
            bank_max_rows: 50_000,
            keep_bank: true,
            seed: 0,
            vim_dim: None,
            react_percentiles: DEFAULT_REACT_PERCENTILES.to_vec(),
            precision_rtol: None,
            logit_tolerance: Some(1e-3),
            perturbation: None,
        }
    }
}

/// A problem with the fit's input or its result.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum FitError {
    /// A bad setting.
    #[error("invalid fit setting: {0}")]
    Config(String),
    /// A buffer length does not match the batch size and K or D.
    #[error("{what} has {found} values, expected {expected}")]
    Shape {
        /// Which buffer.
        what: &'static str,
        /// Expected length.
        expected: usize,
        /// Found length.
        found: usize,
    },
    /// A label outside `0..K`.
    #[error("row {row} of the batch has label {label}, but there are {num_classes} classes")]
    Label {
        /// Row in the batch.
        row: usize,
        /// The label.
        label: u32,
        /// K.
        num_classes: usize,
    },
    /// NaN or infinity in the input.
    #[error("row {row} of the batch has a non-finite value in its {what}")]
    NonFinite {
        /// `features` or `logits`.
        what: &'static str,
        /// Row in the batch.
        row: usize,
    },
    /// The features do not reproduce the logits through `W`, `b`.
    #[error("row {row}: logit {class} is {logit} but W·h + b gives {recomputed}: is the feature tensor the input of the final Gemm, and W laid out K × D?")]
    LogitMismatch {
        /// Row in the batch.
        row: usize,
        /// Class.
        class: usize,
        /// Logit given.
        logit: f32,
        /// Logit recomputed.
        recomputed: f64,
    },
    /// No training frames were pushed.
    #[error("no training frames")]
    NoData,
    /// A class had no training frames (its mean is undefined).
    #[error("class {0} has no training frames")]
    EmptyClass(usize),
    /// A matrix decomposition failed.
    #[error("{what}: {source}")]
    Linalg {
        /// Which computation.
        what: &'static str,
        /// The failure.
        source: LinalgError,
    },
    /// The data gives a degenerate statistic.
    #[error("degenerate training statistics: {0}")]
    Degenerate(String),
}

/// Diagnostics of a fit, for logs and for the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Training frames seen.
    pub n_train: u64,
    /// Fraction whose argmax logit equals the label (OpenOOD prints it as a
    /// sanity check).
    pub train_accuracy: f64,
    /// Largest `|z − (W·h + b)| / (1 + |W·h + b|)` seen.
    pub max_logit_error: f64,
    /// Eigenvalues of the tied covariance dropped by the pseudo-inverse.
    pub precision_dropped: usize,
    /// Condition number of the kept part of the tied covariance.
    pub precision_condition: f64,
    /// Eigenvalues of the whole-train covariance dropped.
    pub background_precision_dropped: usize,
    /// Condition number of the kept part of the whole-train covariance.
    pub background_precision_condition: f64,
    /// ViM: `λ_{D_p} / λ_{D_p+1}` (1-based) of `cov(h − u)`; near 1 means the
    /// principal/null split is ill-defined.
    pub vim_eigengap: f64,
    /// ViM: mean max-logit over all training frames.
    pub vim_mean_max_logit: f64,
    /// ViM: mean residual norm over the subsample.
    pub vim_mean_residual: f64,
    /// Rows in the reservoir subsample (and the bank, when kept).
    pub subsample_rows: usize,
    /// Bank rows that were all zeros (they stay zero; distance 1 to any
    /// unit query).
    pub zero_feature_rows: usize,
}

/// Accumulates training batches; see the module docs.
#[derive(Debug, Clone)]
pub struct Fitter {
    cfg: FitConfig,
    model: ModelInfo,
    training_set: String,
    vim_dim: usize,
    rtol: f64,
    w32: Vec<f32>,
    b32: Vec<f32>,
    w: Vec<f64>,
    b: Vec<f64>,
    counts: Vec<u64>,
    shift: Vec<f64>,
    shift_set: Vec<bool>,
    shifted_sum: Vec<f64>,
    scatter: Vec<f64>,
    max_logit_sum: f64,
    correct: u64,
    n: u64,
    max_logit_error: f64,
    reservoir: Vec<f32>,
    rng: SplitMix64,
    scratch: Vec<f64>,
}

impl Fitter {
    /// A fitter for a model whose final Gemm is `z = W·h + b`, with
    /// `fc_weight` `W` as K × D row-major and `fc_bias` `b` of length K.
    pub fn new(
        cfg: FitConfig,
        model: ModelInfo,
        training_set: impl Into<String>,
        fc_weight: &[f32],
        fc_bias: &[f32],
    ) -> Result<Self, FitError> {
        let (k, d) = (cfg.num_classes, cfg.dim);
        if k == 0 || d < 2 {
            return Err(FitError::Config(format!(
                "num_classes = {k}, dim = {d}: need K ≥ 1 and D ≥ 2"
            )));
        }
        if cfg.bank_max_rows == 0 {
            return Err(FitError::Config(
                "bank_max_rows = 0: the subsample needs at least one row (use keep_bank = false for no KNN bank)".into(),
            ));
        }
        let vim_dim = cfg.vim_dim.unwrap_or_else(|| default_vim_dim(d));
        if vim_dim == 0 || vim_dim >= d {
            return Err(FitError::Config(format!(
                "vim_dim = {vim_dim} is not in 1..{d}"
            )));
        }
        let mut pct = cfg.react_percentiles.clone();
        if pct.iter().any(|p| !(*p > 0.0 && *p <= 100.0)) {
            return Err(FitError::Config(format!(
                "react percentiles {pct:?} must lie in (0, 100]"
            )));
        }
        pct.sort_by(f64::total_cmp);
        pct.dedup();
        let rtol = cfg
            .precision_rtol
            .unwrap_or_else(|| linalg::default_rtol(d));
        if !(0.0..1.0).contains(&rtol) {
            return Err(FitError::Config(format!(
                "precision_rtol = {rtol} is not in [0, 1)"
            )));
        }
        if fc_weight.len() != k * d {
            return Err(FitError::Shape {
                what: "fc_weight",
                expected: k * d,
                found: fc_weight.len(),
            });
        }
        if fc_bias.len() != k {
            return Err(FitError::Shape {
                what: "fc_bias",
                expected: k,
                found: fc_bias.len(),
            });
        }
        if fc_weight.iter().chain(fc_bias).any(|v| !v.is_finite()) {
            return Err(FitError::Config(
                "fc weight or bias has a non-finite value".into(),
            ));
        }
        let seed = cfg.seed;
        Ok(Self {
            cfg: FitConfig {
                react_percentiles: pct,
                ..cfg
            },
            model,
            training_set: training_set.into(),
            vim_dim,
            rtol,
            w32: fc_weight.to_vec(),
            b32: fc_bias.to_vec(),
            w: crate::score::to_f64(fc_weight),
            b: crate::score::to_f64(fc_bias),
            counts: vec![0; k],
            shift: vec![0.0; k * d],
            shift_set: vec![false; k],
            shifted_sum: vec![0.0; k * d],
            scatter: vec![0.0; d * d],
            max_logit_sum: 0.0,
            correct: 0,
            n: 0,
            max_logit_error: 0.0,
            reservoir: Vec::new(),
            rng: SplitMix64::new(seed),
            scratch: Vec::new(),
        })
    }

    /// Training frames pushed so far.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether no frame was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Adds a batch of `batch.n` training frames with their ground-truth
    /// labels. The whole batch is checked first: on error nothing of it is
    /// accumulated.
    pub fn push(&mut self, batch: FeatureBatch<'_>, labels: &[u32]) -> Result<(), FitError> {
        let (k, d, n) = (self.cfg.num_classes, self.cfg.dim, batch.n);
        for (what, expected, found) in [
            ("features", n * d, batch.features.len()),
            ("logits", n * k, batch.logits.len()),
            ("labels", n, labels.len()),
        ] {
            if expected != found {
                return Err(FitError::Shape {
                    what,
                    expected,
                    found,
                });
            }
        }
        // Validate, and compute max-logits of W·h + b, before touching state.
        let mut max_logits = Vec::with_capacity(n);
        let mut batch_err = 0.0f64;
        for (row, &label) in labels.iter().enumerate() {
            if label as usize >= k {
                return Err(FitError::Label {
                    row,
                    label,
                    num_classes: k,
                });
            }
            let h = batch.features_row(row, d);
            let z = batch.logits_row(row, k);
            if h.iter().any(|v| !v.is_finite()) {
                return Err(FitError::NonFinite {
                    what: "features",
                    row,
                });
            }
            if z.iter().any(|v| !v.is_finite()) {
                return Err(FitError::NonFinite {
                    what: "logits",
                    row,
                });
            }
            let mut max = f64::NEG_INFINITY;
            for (c, &zc_given) in z.iter().enumerate() {
                let wc = &self.w[c * d..(c + 1) * d];
                let zc = self.b[c]
                    + wc.iter()
                        .zip(h)
                        .map(|(w, x)| w * f64::from(*x))
                        .sum::<f64>();
                max = max.max(zc);
                let err = (f64::from(zc_given) - zc).abs() / (1.0 + zc.abs());
                if let Some(tol) = self.cfg.logit_tolerance {
                    if err > tol {
                        return Err(FitError::LogitMismatch {
                            row,
                            class: c,
                            logit: zc_given,
                            recomputed: zc,
                        });
                    }
                }
                batch_err = batch_err.max(err);
            }
            max_logits.push(max);
        }
        // Accumulate.
        self.scratch.clear();
        self.scratch.resize(n * d, 0.0);
        for (row, &label) in labels.iter().enumerate() {
            let c = label as usize;
            let h = batch.features_row(row, d);
            if !self.shift_set[c] {
                for (s, x) in self.shift[c * d..(c + 1) * d].iter_mut().zip(h) {
                    *s = f64::from(*x);
                }
                self.shift_set[c] = true;
            }
            let shift = &self.shift[c * d..(c + 1) * d];
            let out = &mut self.scratch[row * d..(row + 1) * d];
            let sum = &mut self.shifted_sum[c * d..(c + 1) * d];
            for j in 0..d {
                let v = f64::from(h[j]) - shift[j];
                out[j] = v;
                sum[j] += v;
            }
            self.counts[c] += 1;
            if argmax(batch.logits_row(row, k)) == c {
                self.correct += 1;
            }
            self.max_logit_sum += max_logits[row];
            // Reservoir (Algorithm R).
            let cap = self.cfg.bank_max_rows;
            let t = self.n + row as u64;
            if t < cap as u64 {
                self.reservoir.extend_from_slice(h);
            } else {
                let j = self.rng.below(t + 1);
                if j < cap as u64 {
                    let j = j as usize;
                    self.reservoir[j * d..(j + 1) * d].copy_from_slice(h);
                }
            }
        }
        linalg::add_gram(&self.scratch, n, d, &mut self.scatter);
        self.n += n as u64;
        self.max_logit_error = self.max_logit_error.max(batch_err);
        Ok(())
    }

    /// Computes the statistics.
    pub fn finish(self) -> Result<(Stats, FitReport), FitError> {
        let (k, d) = (self.cfg.num_classes, self.cfg.dim);
        if self.n == 0 {
            return Err(FitError::NoData);
        }
        if let Some(c) = self.counts.iter().position(|&c| c == 0) {
            return Err(FitError::EmptyClass(c));
        }
        let n = self.n as f64;
        // Class means and the within-class scatter.
        let mut class_means = vec![0.0f64; k * d];
        let mut s_w = self.scatter.clone();
        for c in 0..k {
            let nc = self.counts[c] as f64;
            let dc: Vec<f64> = self.shifted_sum[c * d..(c + 1) * d]
                .iter()
                .map(|s| s / nc)
                .collect();
            for j in 0..d {
                class_means[c * d + j] = self.shift[c * d + j] + dc[j];
            }
            add_outer(&mut s_w, &dc, -nc);
        }
        symmetrize(&mut s_w, d);
        // Whole-train mean and scatter: S_bg = S_w + Σ_c n_c (μ_c − μ)(μ_c − μ)ᵀ.
        let mut mean = vec![0.0f64; d];
        for c in 0..k {
            let nc = self.counts[c] as f64;
            for j in 0..d {
                mean[j] += nc * class_means[c * d + j];
            }
        }
        for m in &mut mean {
            *m /= n;
        }
        let mut s_bg = s_w.clone();
        for c in 0..k {
            let diff: Vec<f64> = (0..d).map(|j| class_means[c * d + j] - mean[j]).collect();
            add_outer(&mut s_bg, &diff, self.counts[c] as f64);
        }
        symmetrize(&mut s_bg, d);
        let cov_w: Vec<f64> = s_w.iter().map(|v| v / n).collect();
        let cov_bg: Vec<f64> = s_bg.iter().map(|v| v / n).collect();
        let linalg_err = |what| move |source| FitError::Linalg { what, source };
        let precision =
            linalg::pinvh(&cov_w, d, self.rtol).map_err(linalg_err("tied covariance"))?;
        let background =
            linalg::pinvh(&cov_bg, d, self.rtol).map_err(linalg_err("whole-train covariance"))?;
        if precision.dropped == d || background.dropped == d {
            return Err(FitError::Degenerate("the features do not vary".into()));
        }
        // ViM: u = −pinv(W)·b, cov(h − u) = cov_bg + (μ − u)(μ − u)ᵀ.
        let u: Vec<f64> = linalg::pinv_apply(&self.w, k, d, &self.b)
            .map_err(linalg_err("pinv(W)"))?
            .into_iter()
            .map(|v| -v)
            .collect();
        let mut cov_vim = cov_bg.clone();
        let mu_u: Vec<f64> = mean.iter().zip(&u).map(|(m, u)| m - u).collect();
        add_outer(&mut cov_vim, &mu_u, 1.0);
        symmetrize(&mut cov_vim, d);
        let eig = linalg::sym_eigen(&cov_vim, d).map_err(linalg_err("ViM covariance"))?;
        let dp = self.vim_dim;
        let rows = self.reservoir.len() / d;
        let mean_residuals = mean_residual_norms(&self.reservoir, rows, d, &u, &eig.vectors);
        let mean_residual = mean_residuals[dp - 1];
        let mean_max_logit = self.max_logit_sum / n;
        if let Some(i) = mean_residuals.iter().position(|r| r.is_nan() || *r <= 0.0) {
            return Err(FitError::Degenerate(format!(
                "ViM residual norm for D_p = {} is {} on average: the features lie in the principal subspace",
                i + 1,
                mean_residuals[i]
            )));
        }
        // ReAct.
        let mut values = self.reservoir.clone();
        let react_clip: Vec<f64> = self
            .cfg
            .react_percentiles
            .iter()
            .map(|&p| percentile_linear(&mut values, p))
            .collect();
        // KNN bank.
        let mut zero_rows = 0;
        let mut bank = self.reservoir;
        for row in bank.chunks_exact_mut(d) {
            let norm = row
                .iter()
                .map(|v| f64::from(*v).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm == 0.0 {
                zero_rows += 1;
                continue;
            }
            for v in row {
                *v = (f64::from(*v) / norm) as f32;
            }
        }
        let bank_rows = if self.cfg.keep_bank { rows } else { 0 };
        let mut supports = Vec::new();
        if bank_rows > 0 {
            supports.push("knn".to_string());
        }
        supports.extend(["vim", "mds", "rmds", "react", "fdbd"].map(String::from));
        let meta = StatsMeta {
            format: FORMAT.to_string(),
            version: FORMAT_VERSION,
            model: self.model,
            training_set: self.training_set,
            dim: d,
            num_classes: k,
            n_train: self.n,
            bank: BankInfo {
                rows: bank_rows,
                max_rows: self.cfg.bank_max_rows,
                seed: self.cfg.seed,
                sampling: if (rows as u64) == self.n {
                    "all"
                } else {
                    "reservoir"
                }
                .to_string(),
            },
            vim_dim: dp,
            precision_rtol: self.rtol,
            subsample_rows: rows,
            supports,
            perturbation: self.cfg.perturbation,
            created_by: concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).to_string(),
        };
        let report = FitReport {
            n_train: self.n,
            train_accuracy: self.correct as f64 / n,
            max_logit_error: self.max_logit_error,
            precision_dropped: precision.dropped,
            precision_condition: precision.max_eigenvalue / precision.min_kept_eigenvalue,
            background_precision_dropped: background.dropped,
            background_precision_condition: background.max_eigenvalue
                / background.min_kept_eigenvalue,
            vim_eigengap: eig.values[dp - 1] / eig.values[dp],
            vim_mean_max_logit: mean_max_logit,
            vim_mean_residual: mean_residual,
            subsample_rows: rows,
            zero_feature_rows: zero_rows,
        };
        let stats = Stats {
            meta,
            fc_weight: self.w32,
            fc_bias: self.b32,
            train_mean: mean,
            class_means,
            class_counts: self.counts.iter().map(|&c| c as i64).collect(),
            precision: precision.matrix,
            background_precision: background.matrix,
            vim_origin: u,
            vim_eigenvectors: eig.vectors,
            vim_mean_max_logit: mean_max_logit,
            vim_mean_residual: mean_residuals,
            vim_eigenvalues: eig.values,
            react_percentiles: self.cfg.react_percentiles,
            react_clip,
            knn_bank: if bank_rows > 0 { bank } else { Vec::new() },
        };
        stats
            .validate()
            .map_err(|e| FitError::Degenerate(format!("fitted statistics fail validation: {e}")))?;
        Ok((stats, report))
    }
}

/// `m ← m + scale · v vᵀ`.
fn add_outer(m: &mut [f64], v: &[f64], scale: f64) {
    let d = v.len();
    for i in 0..d {
        let vi = scale * v[i];
        for j in 0..d {
            m[i * d + j] += vi * v[j];
        }
    }
}

fn symmetrize(m: &mut [f64], d: usize) {
    for i in 0..d {
        for j in i + 1..d {
            let v = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = v;
            m[j * d + i] = v;
        }
    }
}

/// For every D_p in 1..d, the mean over `rows` feature rows of the residual
/// norm `‖(h − u)ᵀ · NS‖`, NS being the eigenvectors (columns of `vectors`,
/// `d × d`) from D_p on: one projection onto all eigenvectors per row, then
/// suffix sums of the squared coordinates.
fn mean_residual_norms(x: &[f32], rows: usize, d: usize, u: &[f64], vectors: &[f64]) -> Vec<f64> {
    const BLOCK: usize = 1024;
    let mut totals = vec![0.0f64; d - 1];
    let mut centered = Vec::with_capacity(BLOCK * d);
    let mut proj = vec![0.0f64; BLOCK * d];
    for start in (0..rows).step_by(BLOCK) {
        let m = BLOCK.min(rows - start);
        centered.clear();
        for r in start..start + m {
            centered.extend(
                x[r * d..(r + 1) * d]
                    .iter()
                    .zip(u)
                    .map(|(h, u)| f64::from(*h) - u),
            );
        }
        linalg::gemm_into(&centered, m, d, vectors, d, 0.0, &mut proj[..m * d]);
        for row in proj[..m * d].chunks_exact(d) {
            let mut tail = 0.0f64;
            for dp in (1..d).rev() {
                tail += row[dp] * row[dp];
                totals[dp - 1] += tail.sqrt();
            }
        }
    }
    totals.iter().map(|t| t / rows as f64).collect()
}

/// The `p`-th percentile (0–100) of `values` with linear interpolation
/// between order statistics, as `numpy.percentile(values, p)` (method
/// `"linear"`, numpy's `_lerp`). Reorders `values`. NaN-free input is
/// assumed (the fitter rejects non-finite features); empty input gives NaN.
pub fn percentile_linear(values: &mut [f32], p: f64) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let pos = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = (pos.floor() as usize).min(n - 1);
    let t = pos - lo as f64;
    let (_, a, right) = values.select_nth_unstable_by(lo, f32::total_cmp);
    let a = f64::from(*a);
    if lo + 1 >= n || t == 0.0 {
        return a;
    }
    let b = f64::from(right.iter().copied().fold(f32::INFINITY, f32::min));
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "toy".into(),
            sha256: "00".repeat(32),
            feature_tensor: "features".into(),
        }
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1, 2, 3, 4], [0, 25, 50, 90, 100])
        // = [1.0, 1.75, 2.5, 3.7, 4.0]
        let base = [4.0f32, 1.0, 3.0, 2.0];
        for (p, want) in [
            (0.0, 1.0),
            (25.0, 1.75),
            (50.0, 2.5),
            (90.0, 3.7),
            (100.0, 4.0),
        ] {
            let mut v = base;
            let got = percentile_linear(&mut v, p);
            assert!((got - want).abs() < 1e-12, "p={p}: {got} vs {want}");
        }
        assert!(percentile_linear(&mut [], 50.0).is_nan());
    }

    #[test]
    fn vim_dim_defaults_follow_the_paper() {
        assert_eq!(default_vim_dim(64), 32);
        assert_eq!(default_vim_dim(128), 64);
        assert_eq!(default_vim_dim(512), 256);
        assert_eq!(default_vim_dim(768), 512);
        assert_eq!(default_vim_dim(2048), 1000);
    }

    /// Two classes in 2-D, hand-checkable statistics.
    #[test]
    fn tiny_fit_has_hand_checked_statistics() {
        // W = I, b = 0: logits = features.
        let w = [1.0f32, 0.0, 0.0, 1.0];
        let b = [0.0f32, 0.0];
        let mut cfg = FitConfig::new(2, 2);
        cfg.vim_dim = Some(1);
        cfg.react_percentiles = vec![50.0];
        let mut f = Fitter::new(cfg, model(), "toy", &w, &b).unwrap();
        // Class 0: (2,0), (4,0), (3,1), (3,-1): mean (3,0).
        // Class 1: (0,2), (0,4), (1,3), (-1,3): mean (0,3).
        let x = [
            2.0f32, 0.0, 4.0, 0.0, 3.0, 1.0, 3.0, -1.0, 0.0, 2.0, 0.0, 4.0, 1.0, 3.0, -1.0, 3.0,
        ];
        let labels = [0, 0, 0, 0, 1, 1, 1, 1];
        // Push in two uneven batches.
        f.push(
            FeatureBatch {
                logits: &x[..6],
                features: &x[..6],
                n: 3,
            },
            &labels[..3],
        )
        .unwrap();
        f.push(
            FeatureBatch {
                logits: &x[6..],
                features: &x[6..],
                n: 5,
            },
            &labels[3..],
        )
        .unwrap();
        let (s, rep) = f.finish().unwrap();
        assert_eq!(s.class_means, vec![3.0, 0.0, 0.0, 3.0]);
        assert_eq!(s.train_mean, vec![1.5, 1.5]);
        assert_eq!(rep.train_accuracy, 1.0);
        // Within-class scatter: class 0 deviations (-1,0),(1,0),(0,1),(0,-1)
        // → diag(2, 2); class 1 the same → S_w = diag(4, 4), Σ = diag(.5, .5).
        let want_p = [2.0, 0.0, 0.0, 2.0];
        for (a, b) in s.precision.iter().zip(want_p) {
            assert!((a - b).abs() < 1e-12, "{:?}", s.precision);
        }
        // Whole-train: Σ_bg = Σ + between, between = ¼·[[9,-9],[-9,9]]·... :
        // μ_c − μ = ±(1.5, −1.5), Σ_c n_c/N (.)(.)ᵀ = [[2.25,-2.25],[-2.25,2.25]].
        // Σ_bg = [[2.75,-2.25],[-2.25,2.75]], inverse = [[2.75,2.25],[2.25,2.75]]/2.5.
        let want_bg = [1.1, 0.9, 0.9, 1.1];
        for (a, b) in s.background_precision.iter().zip(want_bg) {
            assert!((a - b).abs() < 1e-12, "{:?}", s.background_precision);
        }
        // u = −pinv(I)·0 = 0; cov(h) = Σ_bg + μμᵀ = [[5,0],[0,5]]: a repeated
        // eigenvalue, any null-space vector is fine; its norm is 1.
        assert_eq!(s.vim_origin, vec![0.0, 0.0]);
        let ns_norm: f64 = (0..2).map(|i| s.vim_eigenvectors[i * 2 + 1].powi(2)).sum();
        assert!((ns_norm - 1.0).abs() < 1e-12);
        // Median of the 16 activations {-1,-1,0×4,1,1,2,2,3×4,4,4}: (1+2)/2.
        assert_eq!(s.react_clip, vec![1.5]);
        assert_eq!(s.meta.bank.sampling, "all");
        assert_eq!(s.knn_bank.len(), 16);
        // Hand-checked MDS / RMDS at h = (3, 0) (class 0's mean):
        // MD_0 = 0, MD_1 = 2·(9 + 9) = 36, so MDS = −0 = 0; the background
        // distance with d = h − μ = (1.5, −1.5) is
        // (1.1·2.25 + 1.1·2.25 − 2·0.9·2.25) = 0.9, so RMDS = 0.9 − 0.
        use crate::score::{Detector, Mds, Rmds};
        let h = [3.0f32, 0.0];
        let fb = FeatureBatch {
            logits: &h,
            features: &h,
            n: 1,
        };
        let mut out = [f32::NAN];
        Mds::new(&s).unwrap().score_batch(fb, &mut out).unwrap();
        assert!(out[0].abs() < 1e-6, "{}", out[0]);
        Rmds::new(&s).unwrap().score_batch(fb, &mut out).unwrap();
        assert!((out[0] - 0.9).abs() < 1e-6, "{}", out[0]);
    }

    #[test]
    fn bad_batches_are_refused_whole() {
        let w = [1.0f32, 0.0, 0.0, 1.0];
        let b = [0.0f32, 0.0];
        let mut f = Fitter::new(FitConfig::new(2, 2), model(), "toy", &w, &b).unwrap();
        let x = [1.0f32, 0.0, 0.0, 1.0];
        let e = f
            .push(
                FeatureBatch {
                    logits: &x,
                    features: &x,
                    n: 2,
                },
                &[0, 2],
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                FitError::Label {
                    row: 1,
                    label: 2,
                    ..
                }
            ),
            "{e}"
        );
        let bad = [1.0f32, 0.0, f32::NAN, 1.0];
        let e = f
            .push(
                FeatureBatch {
                    logits: &x,
                    features: &bad,
                    n: 2,
                },
                &[0, 1],
            )
            .unwrap_err();
        assert_eq!(
            e,
            FitError::NonFinite {
                what: "features",
                row: 1
            }
        );
        // Logits that W·h + b does not give: a wrong feature tensor.
        let z = [1.0f32, 0.0, 5.0, 1.0];
        let e = f
            .push(
                FeatureBatch {
                    logits: &z,
                    features: &x,
                    n: 2,
                },
                &[0, 1],
            )
            .unwrap_err();
        assert!(e.to_string().contains("final Gemm"), "{e}");
        assert!(f.is_empty());
        let e = f
            .push(
                FeatureBatch {
                    logits: &x,
                    features: &x[..3],
                    n: 2,
                },
                &[0, 1],
            )
            .unwrap_err();
        assert!(matches!(
            e,
            FitError::Shape {
                what: "features",
                ..
            }
        ));
        // Only class 0 seen.
        f.push(
            FeatureBatch {
                logits: &x[..2],
                features: &x[..2],
                n: 1,
            },
            &[0],
        )
        .unwrap();
        assert_eq!(f.finish().unwrap_err(), FitError::EmptyClass(1));
    }

    #[test]
    fn reservoir_caps_the_bank_and_is_seeded() {
        let (k, d) = (2, 3);
        let w = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
        let b = [0.0f32; 2];
        let run = |seed| {
            let mut cfg = FitConfig::new(k, d);
            cfg.bank_max_rows = 10;
            cfg.seed = seed;
            cfg.vim_dim = Some(1);
            let mut f = Fitter::new(cfg, model(), "toy", &w, &b).unwrap();
            let mut rng = SplitMix64::new(99);
            for _ in 0..20 {
                let x: Vec<f32> = (0..5 * d).map(|_| rng.next_f64() as f32 + 0.1).collect();
                let z: Vec<f32> = x.chunks(d).flat_map(|r| [r[0], r[1]]).collect();
                f.push(
                    FeatureBatch {
                        logits: &z,
                        features: &x,
                        n: 5,
                    },
                    &[0, 1, 0, 1, 1],
                )
                .unwrap();
            }
            f.finish().unwrap().0
        };
        let (a, b2, c) = (run(1), run(1), run(2));
        assert_eq!(a.meta.bank.rows, 10);
        assert_eq!(a.meta.bank.sampling, "reservoir");
        assert_eq!(a.meta.n_train, 100);
        assert_eq!(a.knn_bank, b2.knn_bank, "same seed, same bank");
        assert_ne!(a.knn_bank, c.knn_bank, "another seed, another bank");
        // Statistics other than the bank use every row.
        assert_eq!(a.class_means, c.class_means);
    }
}
