//! Combining detectors: each score standardised against its
//! in-distribution validation scores, then a weighted sum.

use serde::{Deserialize, Serialize};

use super::{Detector, DetectorError, FeatureBatch};

/// Mean and standard deviation of a detector's scores on in-distribution
/// validation frames.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreNorm {
    /// Mean score.
    pub mean: f64,
    /// Population standard deviation (`numpy.std`, ddof = 0), > 0.
    pub std: f64,
    /// Frames it was computed over.
    pub n: u64,
}

impl ScoreNorm {
    /// `(s − mean) / std`.
    pub fn z(&self, s: f64) -> f64 {
        (s - self.mean) / self.std
    }
}

/// Scores every batch with `detector` and returns the mean and standard
/// deviation (Welford, f64). Fails on a non-finite score, on fewer than two
/// frames, or when all scores are equal.
pub fn calibrate<'a>(
    detector: &dyn Detector,
    batches: impl IntoIterator<Item = FeatureBatch<'a>>,
) -> Result<ScoreNorm, DetectorError> {
    let (mut n, mut mean, mut m2) = (0u64, 0.0f64, 0.0f64);
    let mut out = Vec::new();
    for batch in batches {
        out.clear();
        out.resize(batch.n, 0.0f32);
        detector.score_batch(batch, &mut out)?;
        for &s in &out {
            if !s.is_finite() {
                return Err(DetectorError::NonFiniteScore {
                    detector: detector.tag(),
                    index: n as usize,
                    value: s,
                });
            }
            n += 1;
            let s = f64::from(s);
            let delta = s - mean;
            mean += delta / n as f64;
            m2 += delta * (s - mean);
        }
    }
    if n < 2 {
        return Err(DetectorError::Calibration {
            detector: detector.tag(),
            reason: format!("{n} frame(s); need at least 2"),
        });
    }
    let std = (m2 / n as f64).sqrt();
    if std.is_nan() || std <= 0.0 {
        return Err(DetectorError::Calibration {
            detector: detector.tag(),
            reason: "all scores are equal".into(),
        });
    }
    Ok(ScoreNorm { mean, std, n })
}

struct Part {
    detector: Box<dyn Detector>,
    norm: ScoreNorm,
    weight: f64,
}

/// `score = Σ_i w_i · (s_i − mean_i) / std_i` over several detectors.
pub struct Combined {
    parts: Vec<Part>,
}

impl std::fmt::Debug for Combined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combined")
            .field("tag", &self.tag())
            .finish()
    }
}

impl Combined {
    /// A combination of `(detector, its calibration, weight)`.
    pub fn new(parts: Vec<(Box<dyn Detector>, ScoreNorm, f64)>) -> Result<Self, DetectorError> {
        if parts.is_empty() {
            return Err(DetectorError::Param {
                name: "parts",
                value: "[]".into(),
                reason: "need at least one detector".into(),
            });
        }
        for (det, norm, w) in &parts {
            if !(norm.std > 0.0 && norm.std.is_finite() && norm.mean.is_finite() && w.is_finite()) {
                return Err(DetectorError::Param {
                    name: "parts",
                    value: det.tag(),
                    reason: format!("bad calibration {norm:?} or weight {w}"),
                });
            }
        }
        Ok(Self {
            parts: parts
                .into_iter()
                .map(|(detector, norm, weight)| Part {
                    detector,
                    norm,
                    weight,
                })
                .collect(),
        })
    }
}

impl Detector for Combined {
    fn name(&self) -> &'static str {
        "combined"
    }

    fn tag(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{}*{}", p.weight, p.detector.tag()))
            .collect();
        format!("combined({})", parts.join("+"))
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        if out.len() != batch.n {
            return Err(DetectorError::Shape {
                what: "out",
                expected: batch.n,
                found: out.len(),
            });
        }
        let mut acc = vec![0.0f64; batch.n];
        let mut tmp = vec![0.0f32; batch.n];
        for part in &self.parts {
            part.detector.score_batch(batch, &mut tmp)?;
            for (a, s) in acc.iter_mut().zip(&tmp) {
                *a += part.weight * part.norm.z(f64::from(*s));
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = *a as f32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each frame with its first feature times a factor.
    struct Scale(f32, &'static str);

    impl Detector for Scale {
        fn name(&self) -> &'static str {
            self.1
        }
        fn score_batch(
            &self,
            batch: FeatureBatch<'_>,
            out: &mut [f32],
        ) -> Result<(), DetectorError> {
            batch.check(out, None, Some(1))?;
            for (o, h) in out.iter_mut().zip(batch.features) {
                *o = self.0 * h;
            }
            Ok(())
        }
    }

    fn batch(h: &[f32]) -> FeatureBatch<'_> {
        FeatureBatch {
            logits: &[],
            features: h,
            n: h.len(),
        }
    }

    #[test]
    fn calibration_is_population_mean_and_std() {
        let h = [1.0f32, 2.0, 3.0, 4.0];
        // Two batches: Welford across them.
        let norm = calibrate(&Scale(2.0, "a"), [batch(&h[..1]), batch(&h[1..])]).unwrap();
        assert_eq!((norm.mean, norm.n), (5.0, 4));
        assert!(
            (norm.std - 5f64.sqrt()).abs() < 1e-12,
            "np.std([2,4,6,8]) = √5"
        );
        let e = calibrate(&Scale(0.0, "a"), [batch(&h)]).unwrap_err();
        assert!(e.to_string().contains("all scores are equal"), "{e}");
        let e = calibrate(&Scale(1.0, "a"), [batch(&h[..1])]).unwrap_err();
        assert!(e.to_string().contains("need at least 2"), "{e}");
        let e = calibrate(&Scale(1.0, "a"), [batch(&[1.0, f32::NAN])]).unwrap_err();
        assert!(
            matches!(e, DetectorError::NonFiniteScore { index: 1, .. }),
            "{e}"
        );
    }

    #[test]
    fn combination_is_the_weighted_sum_of_z_scores() {
        let n1 = ScoreNorm {
            mean: 1.0,
            std: 2.0,
            n: 10,
        };
        let n2 = ScoreNorm {
            mean: -3.0,
            std: 0.5,
            n: 10,
        };
        let c = Combined::new(vec![
            (Box::new(Scale(1.0, "a")) as Box<dyn Detector>, n1, 0.25),
            (Box::new(Scale(-1.0, "b")), n2, 2.0),
        ])
        .unwrap();
        assert_eq!(c.tag(), "combined(0.25*a+2*b)");
        let mut out = [0.0f32; 2];
        c.score_batch(batch(&[5.0, -1.0]), &mut out).unwrap();
        // h = 5: 0.25·(5−1)/2 + 2·(−5+3)/0.5 = 0.5 − 8.
        assert_eq!(out, [-7.5, 0.25 * (-2.0 / 2.0) + 2.0 * (1.0 + 3.0) / 0.5]);
        assert!(Combined::new(vec![]).is_err());
        let bad = ScoreNorm { std: 0.0, ..n1 };
        assert!(Combined::new(vec![(
            Box::new(Scale(1.0, "a")) as Box<dyn Detector>,
            bad,
            1.0
        )])
        .is_err());
    }
}
