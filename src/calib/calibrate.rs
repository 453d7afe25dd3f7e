//! Calibration: choose ODIN's (T, ε) by the paper's grid search when
//! out-of-distribution validation data is given, then set δ so that a chosen
//! fraction (95%) of in-distribution validation images is kept. The result
//! is a JSON file `serve --calibration` loads.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::{self, threshold_at_tpr};
use crate::score::Method;

/// The paper's temperature grid.
pub const TEMPERATURES: [f32; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// The paper's ε grid: 21 values evenly from 0 to 0.004.
pub fn epsilons() -> Vec<f32> {
    // In f64 first, so each ε is the f32 nearest its decimal (0.0032, not
    // 0.0032000001).
    (0..21).map(|i| (f64::from(i) * 0.0002) as f32).collect()
}

/// A calibration: what `serve --calibration` loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Scoring method with its hyper-parameters, e.g. `odin`, `knn(k=10)`
    /// or `combined` (see `combination`).
    pub method: String,
    /// Temperature T.
    pub temperature: f32,
    /// Perturbation size ε.
    pub epsilon: f32,
    /// Threshold δ: in-distribution iff score ≥ δ.
    pub threshold: f32,
    /// The true-positive rate δ was set at.
    pub tpr: f64,
    /// The model it was fit for.
    pub model: String,
    /// Which images it was fit on.
    pub fit_on: FitData,
    /// Metrics on the tuning data at the chosen point (when OOD data was given).
    pub metrics: Option<PointMetrics>,
    /// How (T, ε) were chosen.
    pub selection: String,
    /// The fit statistics the detector needs (feature-space methods), by
    /// file name relative to this file's folder (or absolute) and SHA-256.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fit_stats: Vec<StatsRef>,
    /// For `combined`: the parts, their weights and z-score statistics; the
    /// parts that read perturbed frames share this file's T and ε.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combination: Option<CombinationSpec>,
    /// `calibrate --auto`: the best candidates of the search on the tuning
    /// split, best first (informative; not read by `serve`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaderboard: Vec<Candidate>,
}

/// A fit statistics file a calibration needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsRef {
    /// Its path, relative to the calibration file's folder, or absolute.
    pub file: String,
    /// SHA-256 (hex) of the file: a different file is refused.
    pub sha256: String,
    /// The perturbation its training features were taken under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perturbation: Option<crate::fit::FitPerturbation>,
}

/// A z-scored weighted sum of detectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CombinationSpec {
    /// Its parts.
    pub parts: Vec<PartSpec>,
}

/// One part of a combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartSpec {
    /// The method, e.g. `odin` or `knn(k=10)` (not `combined`).
    pub method: String,
    /// Its softmax temperature (msp, odin, energy; 1 otherwise).
    pub temperature: f32,
    /// Whether it reads the perturbed frame.
    pub perturbed: bool,
    /// Weight.
    pub weight: f64,
    /// Mean of its scores on the in-distribution tuning images.
    pub mean: f64,
    /// Their standard deviation (population).
    pub std: f64,
    /// Index in `fit_stats` of the statistics it uses (feature detectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<usize>,
}

/// One scored candidate of a search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// What was scored.
    pub detector: String,
    /// FPR at the calibration TPR on the pooled tuning OOD images.
    pub fpr_at_tpr: f64,
    /// AUROC there.
    pub auroc: f64,
}

/// The images a calibration was fit on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitData {
    /// In-distribution validation images.
    pub in_distribution: String,
    /// Out-of-distribution validation images, if any.
    pub out_of_distribution: Vec<String>,
}

/// Metrics at the chosen (T, ε).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PointMetrics {
    /// FPR at the calibration TPR.
    pub fpr_at_tpr: f64,
    /// Detection error.
    pub detection_error: f64,
    /// AUROC.
    pub auroc: f64,
}

/// Why a calibration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// Reading or parsing failed.
    #[error("calibration file {path}: {detail}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

impl Calibration {
    /// Reads a calibration file.
    pub fn load(path: &Path) -> Result<Calibration, CalibrationError> {
        let text = std::fs::read_to_string(path).map_err(|e| CalibrationError::Invalid {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Calibration::parse(&text, &path.display().to_string())
    }

    /// Parses and checks calibration JSON; `name` only names it in errors.
    pub fn parse(text: &str, name: &str) -> Result<Calibration, CalibrationError> {
        let invalid = |detail: String| CalibrationError::Invalid {
            path: name.to_string(),
            detail,
        };
        let calibration: Calibration =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let method = calibration.method.parse::<Method>().map_err(invalid)?;
        match (&calibration.combination, method) {
            (None, Method::Combined) => {
                return Err(invalid("method combined needs a combination".into()))
            }
            (Some(c), _) => {
                if c.parts.is_empty() {
                    return Err(invalid("the combination has no parts".into()));
                }
                for part in &c.parts {
                    let m = part.method.parse::<Method>().map_err(invalid)?;
                    if m == Method::Combined {
                        return Err(invalid("a combination cannot contain another".into()));
                    }
                    if !(part.std > 0.0
                        && part.std.is_finite()
                        && part.mean.is_finite()
                        && part.weight.is_finite()
                        && part.temperature > 0.0)
                    {
                        return Err(invalid(format!(
                            "combination part {}: weight, mean and temperature must be finite, std and temperature positive",
                            part.method
                        )));
                    }
                    if let Some(i) = part.stats {
                        if i >= calibration.fit_stats.len() {
                            return Err(invalid(format!(
                                "combination part {} uses fit_stats[{i}], which is not listed",
                                part.method
                            )));
                        }
                    }
                }
            }
            _ => {}
        }
        if !(calibration.temperature > 0.0
            && calibration.epsilon >= 0.0
            && calibration.threshold.is_finite())
        {
            return Err(invalid(
                "temperature must be > 0, epsilon >= 0 and threshold finite".into(),
            ));
        }
        Ok(calibration)
    }

    /// The scoring method.
    pub fn method(&self) -> Method {
        self.method.parse().unwrap_or(Method::Odin)
    }

    /// The combination as the scorers take it (statistics by their index
    /// in `fit_stats`), when the method is `combined`.
    pub fn combination(&self) -> Option<crate::score::Combination> {
        let spec = self.combination.as_ref()?;
        Some(spec.combination(self.temperature, self.epsilon))
    }
}

impl CombinationSpec {
    /// The combination as the scorers take it, its perturbed parts reading
    /// frames perturbed at (`temperature`, `epsilon`) when `epsilon > 0`.
    pub fn combination(&self, temperature: f32, epsilon: f32) -> crate::score::Combination {
        use crate::score::{Combination, CombinationPart, Perturbation, ScoreNorm, StatsChoice};
        let parts = self
            .parts
            .iter()
            .map(|p| CombinationPart {
                method: p.method.parse().unwrap_or(Method::Msp),
                temperature: p.temperature,
                perturbed: p.perturbed,
                weight: p.weight,
                norm: ScoreNorm {
                    mean: p.mean,
                    std: p.std,
                    n: 0,
                },
                stats: p.stats.map_or(StatsChoice::Auto, StatsChoice::Index),
            })
            .collect();
        Combination {
            perturbation: (epsilon > 0.0).then_some(Perturbation {
                temperature,
                epsilon,
            }),
            parts,
        }
    }
}

/// The (T, ε) of a grid with the lowest FPR at `tpr`, ties to the smaller
/// T then ε (the cheaper and gentler setting). `grid_id[t][e]` and
/// `grid_ood[t][e]` hold scores.
pub fn best_point(
    grid_id: &[Vec<Vec<f32>>],
    grid_ood: &[Vec<Vec<f32>>],
    temperatures: &[f32],
    epsilons: &[f32],
    tpr: f64,
) -> (usize, usize, PointMetrics) {
    let mut best: Option<(usize, usize, PointMetrics)> = None;
    for ti in 0..temperatures.len() {
        for ei in 0..epsilons.len() {
            let m = metrics::evaluate(&grid_id[ti][ei], &grid_ood[ti][ei], tpr);
            let point = PointMetrics {
                fpr_at_tpr: m.fpr_at_tpr,
                detection_error: m.detection_error,
                auroc: m.auroc,
            };
            if best.is_none_or(|(_, _, b)| point.fpr_at_tpr < b.fpr_at_tpr) {
                best = Some((ti, ei, point));
            }
        }
    }
    best.unwrap_or((
        0,
        0,
        PointMetrics {
            fpr_at_tpr: 1.0,
            detection_error: 0.5,
            auroc: 0.5,
        },
    ))
}

/// δ for ID scores at `tpr`, as f32.
pub fn threshold(id_scores: &[f32], tpr: f64) -> f32 {
    threshold_at_tpr(id_scores, tpr) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_the_papers() {
        let e = epsilons();
        assert_eq!(e.len(), 21);
        assert_eq!(e[0], 0.0);
        assert!((e[20] - 0.004).abs() < 1e-9);
    }

    #[test]
    fn the_point_with_the_lowest_fpr_wins() {
        // Two temperatures × two ε; only (1, 1) separates.
        let id = vec![
            vec![vec![0.5, 0.6], vec![0.5, 0.6]],
            vec![vec![0.5, 0.6], vec![0.9, 0.8]],
        ];
        let ood = vec![
            vec![vec![0.7, 0.5], vec![0.7, 0.5]],
            vec![vec![0.7, 0.5], vec![0.1, 0.2]],
        ];
        let (t, e, m) = best_point(&id, &ood, &[1.0, 2.0], &[0.0, 0.1], 0.95);
        assert_eq!((t, e), (1, 1));
        assert_eq!(m.fpr_at_tpr, 0.0);
    }

    #[test]
    fn a_written_calibration_loads_back() {
        let c = Calibration {
            method: "odin".into(),
            temperature: 1000.0,
            epsilon: 0.0014,
            threshold: 0.1012,
            tpr: 0.95,
            model: "m".into(),
            fit_on: FitData {
                in_distribution: "id".into(),
                out_of_distribution: vec![],
            },
            metrics: None,
            selection: "defaults".into(),
            fit_stats: vec![],
            combination: None,
            leaderboard: vec![],
        };
        let path = std::env::temp_dir().join(format!("odin-cal-{}.json", std::process::id()));
        std::fs::write(&path, serde_json::to_string(&c).expect("json")).expect("write");
        assert_eq!(Calibration::load(&path).expect("loads"), c);
        std::fs::write(&path, r#"{"method":"nope"}"#).expect("write");
        assert!(Calibration::load(&path).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
