//! Mahalanobis (Lee et al. 2018) and relative Mahalanobis (Ren et al. 2021)
//! distances, as OpenOOD's `mds_postprocessor.py` and
//! `rmds_postprocessor.py` (no input perturbation, penultimate layer only).

use super::{to_f64, Detector, DetectorError, FeatureBatch};
use crate::fit::linalg;
use crate::fit::stats::Stats;

/// A Gaussian `N(μ_c, Σ)` per class sharing a precision `P = Σ⁺`, with
/// `P μ_c` cached so that `MD_c(h) = (h − μ_c)ᵀ P (h − μ_c)` costs one
/// `P h` per frame plus `K·D`: `MD_c = Σ_j (h − μ_c)_j (P h − P μ_c)_j`.
/// (This form avoids the cancellation of expanding `hᵀPh − 2μᵀPh + μᵀPμ`.)
#[derive(Debug, Clone)]
struct Gaussians {
    d: usize,
    k: usize,
    means: Vec<f64>,
    precision: Vec<f64>,
    p_means: Vec<f64>,
}

impl Gaussians {
    fn new(d: usize, means: Vec<f64>, precision: Vec<f64>) -> Self {
        let k = means.len() / d;
        // P symmetric: row c of M·P is P·μ_c.
        let p_means = linalg::gemm(&means, k, d, &precision, d);
        Self {
            d,
            k,
            means,
            precision,
            p_means,
        }
    }

    /// `P·h` for every row of `h` (n × D).
    fn project(&self, h: &[f64], n: usize) -> Vec<f64> {
        linalg::gemm(h, n, self.d, &self.precision, self.d)
    }

    /// `MD_c` of one frame given its `h` and `P·h`.
    fn distance(&self, c: usize, h: &[f64], ph: &[f64]) -> f64 {
        let d = self.d;
        let mu = &self.means[c * d..(c + 1) * d];
        let pmu = &self.p_means[c * d..(c + 1) * d];
        let mut s = 0.0;
        for j in 0..d {
            s += (h[j] - mu[j]) * (ph[j] - pmu[j]);
        }
        s
    }

    /// `min_c MD_c` of one frame.
    fn min_distance(&self, h: &[f64], ph: &[f64]) -> f64 {
        let mut best = f64::INFINITY;
        for c in 0..self.k {
            let md = self.distance(c, h, ph);
            if md.is_nan() {
                return f64::NAN;
            }
            best = best.min(md);
        }
        best
    }
}

/// MDS: `score(h) = max_c −(h − μ_c)ᵀ Σ⁻¹ (h − μ_c)`, with class means μ_c
/// and the tied covariance `Σ = (1/N) Σ_c Σ_{i∈c} (h_i − μ_c)(h_i − μ_c)ᵀ`
/// inverted by `pinvh`.
///
/// OpenOOD v1.5 `mds_postprocessor.py`: class means and the concatenated
/// centred features (l. 46–55), `EmpiricalCovariance(assume_centered=False)`
/// → `precision_` (l. 57–62), `class_scores[:, c] = −(h−μ_c) P (h−μ_c)ᵀ`
/// (l. 72–76), `conf = max_c` (l. 78). OpenOOD rounds the precision to f32
/// and scores in f32; here both are f64.
#[derive(Debug, Clone)]
pub struct Mds {
    g: Gaussians,
}

impl Mds {
    /// MDS from fitted statistics (no hyper-parameters).
    pub fn new(stats: &Stats) -> Result<Self, DetectorError> {
        Ok(Self {
            g: Gaussians::new(
                stats.dim(),
                stats.class_means.clone(),
                stats.precision.clone(),
            ),
        })
    }
}

impl Detector for Mds {
    fn name(&self) -> &'static str {
        "mds"
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        let d = self.g.d;
        batch.check(out, None, Some(d))?;
        let h = to_f64(batch.features);
        let ph = self.g.project(&h, batch.n);
        for i in 0..batch.n {
            let (hi, phi) = (&h[i * d..(i + 1) * d], &ph[i * d..(i + 1) * d]);
            out[i] = (-self.g.min_distance(hi, phi)) as f32;
        }
        Ok(())
    }
}

/// RMDS: `score(h) = max_c −(MD_c(h) − MD_0(h))`, where `MD_0` is the
/// Mahalanobis distance to one background Gaussian fitted on all training
/// features (mean `train_mean`, covariance of `h − train_mean`, `pinvh`).
/// Equivalently `MD_0(h) − min_c MD_c(h)`.
///
/// OpenOOD v1.5 `rmds_postprocessor.py`: class statistics as MDS (l. 46–62),
/// the background mean and precision (l. 64–70),
/// `background_scores = −MD_0` (l. 80–82),
/// `class_scores[:, c] = −MD_c − background_scores` (l. 86–89),
/// `conf = max_c` (l. 91).
#[derive(Debug, Clone)]
pub struct Rmds {
    classes: Gaussians,
    background: Gaussians,
}

impl Rmds {
    /// RMDS from fitted statistics (no hyper-parameters).
    pub fn new(stats: &Stats) -> Result<Self, DetectorError> {
        let d = stats.dim();
        Ok(Self {
            classes: Gaussians::new(d, stats.class_means.clone(), stats.precision.clone()),
            background: Gaussians::new(
                d,
                stats.train_mean.clone(),
                stats.background_precision.clone(),
            ),
        })
    }
}

impl Detector for Rmds {
    fn name(&self) -> &'static str {
        "rmds"
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        let d = self.classes.d;
        batch.check(out, None, Some(d))?;
        let h = to_f64(batch.features);
        let ph = self.classes.project(&h, batch.n);
        let p0h = self.background.project(&h, batch.n);
        for i in 0..batch.n {
            let hi = &h[i * d..(i + 1) * d];
            let md0 = self.background.distance(0, hi, &p0h[i * d..(i + 1) * d]);
            let min_md = self.classes.min_distance(hi, &ph[i * d..(i + 1) * d]);
            out[i] = (md0 - min_md) as f32;
        }
        Ok(())
    }
}
