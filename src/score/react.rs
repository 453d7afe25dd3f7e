//! ReAct (Sun et al., NeurIPS 2021), as OpenOOD's `react_postprocessor.py`.

use super::{lse, Detector, DetectorError, FeatureBatch};
use crate::fit::stats::Stats;

/// ReAct: `score(h) = logsumexp(W · min(h, c) + b)` (energy at T = 1 of the
/// logits recomputed from features clipped from above at `c`, the p-th
/// percentile of all training activations).
///
/// OpenOOD v1.5 `react_postprocessor.py`: `threshold =
/// np.percentile(activation_log.flatten(), percentile)` (l. 39–40),
/// `net.forward_threshold` = `feature.clip(max=threshold)` then `fc`
/// (`resnet18_32x32.py` l. 128–139), `energyconf = logsumexp(output)`
/// (l. 47). Default p = 90 (`configs/postprocessors/react.yml`).
/// Difference: OpenOOD takes the percentile over the ID *validation* split's
/// activations; the fitter takes it over the training subsample (as the
/// ReAct paper, which uses ID training data).
#[derive(Debug, Clone)]
pub struct React {
    k: usize,
    d: usize,
    w: Vec<f64>,
    b: Vec<f64>,
    clip: f64,
    percentile: f64,
}

impl React {
    /// ReAct at a percentile fitted in `stats` (`react.percentiles`).
    pub fn new(stats: &Stats, percentile: f64) -> Result<Self, DetectorError> {
        let clip = stats
            .react_clip_at(percentile)
            .ok_or_else(|| DetectorError::Param {
                name: "percentile",
                value: percentile.to_string(),
                reason: format!(
                    "not fitted; the statistics have {:?}",
                    stats.react_percentiles
                ),
            })?;
        Ok(Self {
            k: stats.num_classes(),
            d: stats.dim(),
            w: super::to_f64(&stats.fc_weight),
            b: super::to_f64(&stats.fc_bias),
            clip,
            percentile,
        })
    }

    /// The clip value.
    pub fn clip(&self) -> f64 {
        self.clip
    }
}

impl Detector for React {
    fn name(&self) -> &'static str {
        "react"
    }

    fn tag(&self) -> String {
        format!("react(p={})", self.percentile)
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        let (k, d) = (self.k, self.d);
        batch.check(out, None, Some(d))?;
        let mut clipped = vec![0.0f64; d];
        let mut z = vec![0.0f64; k];
        for (i, o) in out.iter_mut().enumerate() {
            for (c, h) in clipped.iter_mut().zip(batch.features_row(i, d)) {
                let h = f64::from(*h);
                // `>` keeps NaN as NaN (f64::min would return the clip).
                *c = if h > self.clip { self.clip } else { h };
            }
            for (c, zc) in z.iter_mut().enumerate() {
                let w = &self.w[c * d..(c + 1) * d];
                *zc = self.b[c] + w.iter().zip(&clipped).map(|(w, h)| w * h).sum::<f64>();
            }
            *o = lse(z.iter().copied()) as f32;
        }
        Ok(())
    }
}
