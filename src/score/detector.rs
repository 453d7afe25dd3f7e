//! The detector seam: a batch of frames' logits and penultimate features in,
//! one score per frame out, higher = more in-distribution. Each detector
//! follows the OpenOOD v1.5 postprocessor of the same name (see each type's
//! docs for the exact formula and the OpenOOD lines it follows); those that
//! need training statistics are built from a [`Stats`](crate::fit::Stats)
//! plus their hyper-parameters.
//!
//! All arithmetic is in `f64` on the `f32` inputs; the score is rounded to
//! `f32` at the end.

use thiserror::Error;

/// A batch of frames: row-major logits and features.
#[derive(Debug, Clone, Copy)]
pub struct FeatureBatch<'a> {
    /// Logits, `n × K` row-major.
    pub logits: &'a [f32],
    /// Penultimate features, `n × D` row-major.
    pub features: &'a [f32],
    /// Number of frames.
    pub n: usize,
}

impl<'a> FeatureBatch<'a> {
    /// Logits of frame `i` for `k` classes.
    pub(crate) fn logits_row(&self, i: usize, k: usize) -> &'a [f32] {
        &self.logits[i * k..(i + 1) * k]
    }

    /// Features of frame `i` for dimension `d`.
    pub(crate) fn features_row(&self, i: usize, d: usize) -> &'a [f32] {
        &self.features[i * d..(i + 1) * d]
    }

    /// Checks the lengths of the parts a detector reads and of `out`.
    /// `k`/`d` are `None` for a part the detector does not read.
    pub(crate) fn check(
        &self,
        out: &[f32],
        k: Option<usize>,
        d: Option<usize>,
    ) -> Result<(), DetectorError> {
        if out.len() != self.n {
            return Err(DetectorError::Shape {
                what: "out",
                expected: self.n,
                found: out.len(),
            });
        }
        if let Some(k) = k {
            if self.logits.len() != self.n * k {
                return Err(DetectorError::Shape {
                    what: "logits",
                    expected: self.n * k,
                    found: self.logits.len(),
                });
            }
        }
        if let Some(d) = d {
            if self.features.len() != self.n * d {
                return Err(DetectorError::Shape {
                    what: "features",
                    expected: self.n * d,
                    found: self.features.len(),
                });
            }
        }
        Ok(())
    }
}

/// An error building or running a detector.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DetectorError {
    /// A buffer's length does not match `n` times the detector's K or D.
    #[error("{what} has {found} values, expected {expected}")]
    Shape {
        /// Which buffer: `logits`, `features` or `out`.
        what: &'static str,
        /// Length expected from `n` and the detector's dimensions.
        expected: usize,
        /// Length found.
        found: usize,
    },
    /// A hyper-parameter is out of range.
    #[error("invalid {name} = {value}: {reason}")]
    Param {
        /// The hyper-parameter.
        name: &'static str,
        /// Its value, as text.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The statistics lack what this detector needs.
    #[error("the fit statistics have no {0}")]
    Missing(String),
    /// A bug: a buffer view could not be formed.
    #[error("internal: {0}")]
    Internal(String),
    /// A score needed for calibration was NaN or infinite.
    #[error("{detector} gave a non-finite score ({value}) on calibration frame {index}")]
    NonFiniteScore {
        /// Detector tag.
        detector: String,
        /// Frame index in the calibration stream.
        index: usize,
        /// The score.
        value: f32,
    },
    /// Calibration needs at least two frames with distinct scores.
    #[error("cannot calibrate {detector}: {reason}")]
    Calibration {
        /// Detector tag.
        detector: String,
        /// Why.
        reason: String,
    },
}

/// Turns a batch of frames into scores; higher = more in-distribution.
///
/// Implementations are immutable after construction and can be shared
/// between threads.
pub trait Detector: Send + Sync {
    /// The method's short name, as on the CLI: `knn`, `vim`, `mds`, `rmds`,
    /// `react`, `fdbd`, `gen`, `combined`.
    fn name(&self) -> &'static str;

    /// The name with the hyper-parameters that change its scores, e.g.
    /// `knn(k=50)`: the key under which [`Stats`](crate::fit::stats::Stats) keeps
    /// a calibration ([`ScoreNorm`]) for it.
    fn tag(&self) -> String {
        self.name().to_string()
    }

    /// Scores `batch.n` frames into `out[..batch.n]`.
    ///
    /// Errors only when a buffer's length does not match `n` and the
    /// detector's K/D (then `out` is left untouched). Non-finite inputs give
    /// NaN scores, never a panic.
    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError>;
}

/// `logsumexp(z)` in `f64`, stably.
pub(crate) fn lse(z: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = z.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        // All −∞ gives −∞; +∞ gives +∞; NaN propagates.
        return if max.is_nan() || z.clone().any(|v| v.is_nan()) {
            f64::NAN
        } else {
            max
        };
    }
    let sum: f64 = z.map(|v| (v - max).exp()).sum();
    max + sum.ln()
}

/// A `f64` copy of an `f32` slice.
pub(crate) fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| f64::from(*x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_stable() {
        let z = [1000.0, 1000.0];
        let v = lse(z.iter().copied());
        assert!((v - (1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(lse([f64::NEG_INFINITY].iter().copied()), f64::NEG_INFINITY);
        assert!(lse([1.0, f64::NAN].iter().copied()).is_nan());
    }

    #[test]
    fn batch_checks_name_the_buffer() {
        let b = FeatureBatch {
            logits: &[0.0; 6],
            features: &[0.0; 4],
            n: 2,
        };
        let out = [0.0; 2];
        assert!(b.check(&out, Some(3), Some(2)).is_ok());
        let e = b.check(&out, Some(2), Some(2)).unwrap_err();
        assert_eq!(e.to_string(), "logits has 6 values, expected 4");
        let e = b.check(&[0.0; 1], None, None).unwrap_err();
        assert!(e.to_string().starts_with("out has 1"));
    }
}
