//! Fast decision-boundary distance (Liu & Qin, ICML 2024), as OpenOOD's
//! `fdbd_postprocessor.py`.

use super::{argmax, Detector, DetectorError, FeatureBatch};
use crate::fit::stats::Stats;

/// What fDBD divides the summed boundary distances by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdbdNormalizer {
    /// `‖h − μ_train‖` (OpenOOD's default, `distance_as_normalizer: True`).
    TrainMean,
    /// `‖h‖` (`distance_as_normalizer: False`).
    FeatureNorm,
}

/// fDBD: `score(h, z) = Σ_{c ≠ ŷ} |z_ŷ − z_c| / ‖w_ŷ − w_c‖ ÷ ‖h − μ_train‖`
/// with `ŷ = argmax z`.
///
/// OpenOOD v1.5 `fdbd_postprocessor.py`: `train_mean` (l. 49–52), the
/// denominator matrix `‖w − w_p‖` with its diagonal set to 1 (l. 63–68),
/// `logits_sub = |z − z_max|` and
/// `score = Σ logits_sub / denominator[ŷ] / ‖h − train_mean‖` (l. 79–84).
/// Note OpenOOD **sums** over classes; the paper's average (÷ (K−1)) is the
/// same ranking. The ŷ term is 0/1 = 0. A frame with `h = μ_train` gets +∞
/// (0/0 = NaN when its logits are all equal), as in OpenOOD.
#[derive(Debug, Clone)]
pub struct Fdbd {
    k: usize,
    d: usize,
    inv_denominator: Vec<f64>,
    center: Vec<f64>,
    normalizer: FdbdNormalizer,
}

impl Fdbd {
    /// fDBD from fitted statistics.
    pub fn new(stats: &Stats, normalizer: FdbdNormalizer) -> Result<Self, DetectorError> {
        let (k, d) = (stats.num_classes(), stats.dim());
        let w = &stats.fc_weight;
        let mut inv = vec![0.0f64; k * k];
        for p in 0..k {
            for c in 0..k {
                if p == c {
                    inv[p * k + c] = 1.0;
                    continue;
                }
                let dist = (0..d)
                    .map(|j| (f64::from(w[c * d + j]) - f64::from(w[p * d + j])).powi(2))
                    .sum::<f64>()
                    .sqrt();
                if dist == 0.0 {
                    return Err(DetectorError::Param {
                        name: "fc.weight",
                        value: format!("rows {p} and {c}"),
                        reason: "two classes have identical weights: no decision boundary".into(),
                    });
                }
                inv[p * k + c] = 1.0 / dist;
            }
        }
        Ok(Self {
            k,
            d,
            inv_denominator: inv,
            center: match normalizer {
                FdbdNormalizer::TrainMean => stats.train_mean.clone(),
                FdbdNormalizer::FeatureNorm => vec![0.0; d],
            },
            normalizer,
        })
    }
}

impl Detector for Fdbd {
    fn name(&self) -> &'static str {
        "fdbd"
    }

    fn tag(&self) -> String {
        match self.normalizer {
            FdbdNormalizer::TrainMean => "fdbd(train_mean)".into(),
            FdbdNormalizer::FeatureNorm => "fdbd(feature_norm)".into(),
        }
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        let (k, d) = (self.k, self.d);
        batch.check(out, Some(k), Some(d))?;
        for (i, o) in out.iter_mut().enumerate() {
            let z = batch.logits_row(i, k);
            let p = argmax(z);
            let zp = f64::from(z[p]);
            let inv = &self.inv_denominator[p * k..(p + 1) * k];
            let num: f64 = z
                .iter()
                .zip(inv)
                .map(|(zc, inv)| (zp - f64::from(*zc)).abs() * inv)
                .sum();
            let norm = batch
                .features_row(i, d)
                .iter()
                .zip(&self.center)
                .map(|(h, m)| (f64::from(*h) - m).powi(2))
                .sum::<f64>()
                .sqrt();
            *o = (num / norm) as f32;
        }
        Ok(())
    }
}
