//! Scoring: from a frame's engine outputs to one number where higher means
//! "more in-distribution", for every method, so one rule
//! `score >= threshold` serves them all.
//!
//! Logit methods (`msp`, `odin`, `energy`, `maxlogit`, `gen`) read the
//! logits of the frame, or of its ODIN-perturbed version; the feature-space
//! detectors (`knn`, `vim`, `mds`, `rmds`, `react`, `fdbd`, one file each)
//! also read its penultimate features and training statistics fitted by
//! `fit` (`crate::fit`). Every method except `msp` and `maxlogit` reads the
//! perturbed frame when ε > 0. A z-scored weighted sum of several
//! (`combined`) is a method too. [`Scorers`] holds what a served
//! generation scores with and scores whole batches at once (the KNN search
//! is one GEMM per block of the bank for the batch).

mod combine;
mod detector;
mod fdbd;
mod gen;
mod knn;
mod mahalanobis;
mod react;
mod scorers;
mod vim;

use std::fmt;
use std::str::FromStr;

pub use combine::{calibrate as score_norm, Combined, ScoreNorm};
pub(crate) use detector::{lse, to_f64};
pub use detector::{Detector, DetectorError, FeatureBatch};
pub use fdbd::{Fdbd, FdbdNormalizer};
pub use gen::Gen;
pub use knn::{Knn, KnnBank, BLOCK_ROWS as KNN_BLOCK_ROWS};
pub use mahalanobis::{Mds, Rmds};
pub use react::React;
pub use scorers::{
    BatchView, Combination, CombinationPart, LoadedStats, ScoreError, Scorers, StatsChoice,
};
pub use vim::Vim;

/// KNN's default number of neighbours (OpenOOD's).
pub const DEFAULT_KNN_K: u32 = 50;
/// ReAct's default percentile (OpenOOD's), in hundredths.
pub const DEFAULT_REACT_PERCENTILE: u32 = 9000;
/// GEN's default γ (OpenOOD's), in thousandths.
pub const DEFAULT_GEN_GAMMA: u32 = 100;
/// GEN's default M (OpenOOD's).
pub const DEFAULT_GEN_M: u32 = 100;

/// A scoring method with the hyper-parameters that change its scores, as
/// named on the CLI, in calibration files and in frames' overrides:
/// `msp`, `odin`, `energy`, `maxlogit`, `knn(k=50)`, `vim(dim=32)`, `mds`,
/// `rmds`, `react(p=90)`, `fdbd`, `gen(gamma=0.1,M=100)`, `combined`. A
/// bare name takes the defaults; `name:key=value,...` is accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Maximum softmax probability at temperature T (Hendrycks & Gimpel 2017).
    Msp,
    /// ODIN (Liang et al. 2018): max softmax at temperature T of the input
    /// perturbed by ε against the gradient of its own cross-entropy loss.
    Odin,
    /// The largest logit.
    MaxLogit,
    /// Negative free energy, `T · logsumexp(z / T)` (Liu et al. 2020).
    Energy,
    /// Deep k-nearest neighbours (Sun et al. 2022): minus the squared
    /// distance of the normalised feature to its k-th nearest training
    /// feature.
    Knn {
        /// Neighbours.
        k: u32,
    },
    /// Virtual-logit matching (Wang et al. 2022).
    Vim {
        /// Principal dimension D_p; 0 for the fitted default.
        dim: u32,
    },
    /// Mahalanobis distance to the nearest class mean (Lee et al. 2018).
    Mds,
    /// Relative Mahalanobis distance (Ren et al. 2021).
    Rmds,
    /// ReAct (Sun et al. 2021): energy of the logits of clipped features.
    React {
        /// Clip percentile of the training activations, in hundredths.
        percentile: u32,
    },
    /// Fast decision-boundary distance (Liu & Qin 2024).
    Fdbd,
    /// Generalized entropy (Liu et al. 2023).
    Gen {
        /// γ, in thousandths.
        gamma: u32,
        /// The M largest probabilities.
        m: u32,
    },
    /// The calibrated weighted sum of z-scored detectors (`calibrate --auto`).
    Combined,
}

impl Method {
    /// The method's name without hyper-parameters.
    pub fn name(self) -> &'static str {
        match self {
            Method::Msp => "msp",
            Method::Odin => "odin",
            Method::MaxLogit => "maxlogit",
            Method::Energy => "energy",
            Method::Knn { .. } => "knn",
            Method::Vim { .. } => "vim",
            Method::Mds => "mds",
            Method::Rmds => "rmds",
            Method::React { .. } => "react",
            Method::Fdbd => "fdbd",
            Method::Gen { .. } => "gen",
            Method::Combined => "combined",
        }
    }

    /// The method as named on the CLI and in verdicts, hyper-parameters
    /// included (the bare name for methods without any).
    pub fn as_str(self) -> String {
        self.to_string()
    }

    /// Whether this method reads the penultimate features (and fit
    /// statistics).
    pub fn needs_features(self) -> bool {
        matches!(
            self,
            Method::Knn { .. }
                | Method::Vim { .. }
                | Method::Mds
                | Method::Rmds
                | Method::React { .. }
                | Method::Fdbd
        )
    }

    /// Whether this method uses the perturbed input when ε > 0: every one
    /// but the two baselines, which read the frame as sent.
    pub fn perturbs(self) -> bool {
        !matches!(self, Method::Msp | Method::MaxLogit)
    }

    /// Every method, for messages.
    pub const ALL: &'static str =
        "msp, odin, energy, maxlogit, gen, knn, vim, mds, rmds, react, fdbd or combined";
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Method::Knn { k } => write!(f, "knn(k={k})"),
            Method::Vim { dim: 0 } => f.write_str("vim"),
            Method::Vim { dim } => write!(f, "vim(dim={dim})"),
            Method::React { percentile } => {
                write!(f, "react(p={})", f64::from(percentile) / 100.0)
            }
            Method::Gen { gamma, m } => {
                write!(f, "gen(gamma={},M={m})", f64::from(gamma) / 1000.0)
            }
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || format!("unknown scoring method {s:?}: use {}", Method::ALL);
        let s = s.trim();
        let (name, params) = match (s.find('('), s.find(':')) {
            (Some(open), _) if s.ends_with(')') => (&s[..open], &s[open + 1..s.len() - 1]),
            (None, Some(colon)) => (&s[..colon], &s[colon + 1..]),
            (None, None) => (s, ""),
            _ => return Err(unknown()),
        };
        let mut kv: Vec<(&str, &str)> = Vec::new();
        for part in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{s:?}: expected key=value, found {part:?}"))?;
            kv.push((k.trim(), v.trim()));
        }
        let mut take = |key: &str| -> Option<&str> {
            let i = kv.iter().position(|(k, _)| k.eq_ignore_ascii_case(key))?;
            Some(kv.remove(i).1)
        };
        let number = |key: &str, v: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| format!("{s:?}: {key} must be a positive number, found {v:?}"))
        };
        let int = |key: &str, v: &str| -> Result<u32, String> {
            v.parse::<u32>()
                .ok()
                .filter(|x| *x > 0)
                .ok_or_else(|| format!("{s:?}: {key} must be a positive integer, found {v:?}"))
        };
        let method = match name {
            "msp" => Method::Msp,
            "odin" => Method::Odin,
            "maxlogit" | "max-logit" => Method::MaxLogit,
            "energy" => Method::Energy,
            "knn" => Method::Knn {
                k: take("k").map_or(Ok(DEFAULT_KNN_K), |v| int("k", v))?,
            },
            "vim" => {
                let dim = match take("dim") {
                    Some(v) => Some(v),
                    None => take("d"),
                };
                Method::Vim {
                    dim: dim.map_or(Ok(0), |v| int("dim", v))?,
                }
            }
            "mds" => Method::Mds,
            "rmds" => Method::Rmds,
            "react" => {
                let p = match take("p") {
                    Some(v) => Some(v),
                    None => take("percentile"),
                };
                let p = p.map_or(Ok(90.0), |v| number("p", v))?;
                if p > 100.0 {
                    return Err(format!("{s:?}: the percentile must be in (0, 100]"));
                }
                Method::React {
                    percentile: (p * 100.0).round() as u32,
                }
            }
            "fdbd" => Method::Fdbd,
            "gen" => {
                let gamma = take("gamma")
                    .map_or(Ok(f64::from(DEFAULT_GEN_GAMMA) / 1000.0), |v| {
                        number("gamma", v)
                    })?;
                let gamma = (gamma * 1000.0).round() as u32;
                if gamma == 0 {
                    return Err(format!("{s:?}: gamma must be at least 0.001"));
                }
                let m = take("m").map_or(Ok(DEFAULT_GEN_M), |v| int("M", v))?;
                Method::Gen { gamma, m }
            }
            "combined" => Method::Combined,
            _ => return Err(unknown()),
        };
        if let Some((k, _)) = kv.first() {
            return Err(format!("{s:?}: {name} has no parameter {k:?}"));
        }
        Ok(method)
    }
}

/// What the engine computed for one frame.
#[derive(Debug, Clone, Copy)]
pub struct Outputs<'a> {
    /// Logits of the frame as sent.
    pub logits: &'a [f32],
    /// Logits of the perturbed frame, when a perturbation was run.
    pub perturbed: Option<&'a [f32]>,
}

impl<'a> Outputs<'a> {
    /// The perturbed logits when present, else the plain ones.
    pub fn preferred(&self) -> &'a [f32] {
        self.perturbed.unwrap_or(self.logits)
    }
}

/// The settings that produce one score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// Method.
    pub method: Method,
    /// Temperature T.
    pub temperature: f32,
    /// Perturbation size ε (ignored by methods that do not perturb).
    pub epsilon: f32,
}

/// The input perturbation a scoring needs the engine to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perturbation {
    /// Temperature of the loss whose gradient gives the direction.
    pub temperature: f32,
    /// Step size in [0, 1] pixel units.
    pub epsilon: f32,
}

impl Perturbation {
    /// A hashable identity: frames batch together only with equal keys.
    pub fn key(&self) -> (u32, u32) {
        (self.temperature.to_bits(), self.epsilon.to_bits())
    }
}

impl Scoring {
    /// The perturbation to run for this scoring, if any.
    pub fn perturbation(&self) -> Option<Perturbation> {
        (self.method.perturbs() && self.epsilon > 0.0).then_some(Perturbation {
            temperature: self.temperature,
            epsilon: self.epsilon,
        })
    }

    /// The effective ε: zero for methods that do not perturb.
    pub fn effective_epsilon(&self) -> f32 {
        if self.method.perturbs() {
            self.epsilon
        } else {
            0.0
        }
    }

    /// Scores one frame's outputs with a logit method (`msp`, `odin`,
    /// `energy`, `maxlogit`, `gen`); NaN for the methods that need features
    /// or a combination, which score through [`Scorers`].
    pub fn score(&self, outputs: Outputs<'_>) -> f32 {
        scorer(self.method, self.temperature).map_or(f32::NAN, |s| s.score(outputs))
    }
}

/// Turns one frame's outputs into a score; higher = more in-distribution.
pub trait Scorer: Send + Sync {
    /// The method this scorer implements.
    fn method(&self) -> Method;
    /// The score of one frame.
    fn score(&self, outputs: Outputs<'_>) -> f32;
}

/// Max softmax probability at temperature `T`.
#[derive(Debug, Clone, Copy)]
pub struct Msp {
    /// Softmax temperature.
    pub temperature: f32,
}

/// ODIN: max softmax probability at temperature `T` of the perturbed input.
#[derive(Debug, Clone, Copy)]
pub struct Odin {
    /// Softmax temperature.
    pub temperature: f32,
}

/// The largest logit.
#[derive(Debug, Clone, Copy)]
pub struct MaxLogit;

/// `T · logsumexp(z / T)`: the negated energy, so that higher is more in-distribution.
#[derive(Debug, Clone, Copy)]
pub struct Energy {
    /// Temperature.
    pub temperature: f32,
}

impl Scorer for Msp {
    fn method(&self) -> Method {
        Method::Msp
    }
    fn score(&self, outputs: Outputs<'_>) -> f32 {
        max_softmax(outputs.logits, self.temperature)
    }
}

impl Scorer for Odin {
    fn method(&self) -> Method {
        Method::Odin
    }
    fn score(&self, outputs: Outputs<'_>) -> f32 {
        max_softmax(outputs.preferred(), self.temperature)
    }
}

impl Scorer for MaxLogit {
    fn method(&self) -> Method {
        Method::MaxLogit
    }
    fn score(&self, outputs: Outputs<'_>) -> f32 {
        outputs
            .logits
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

impl Scorer for Energy {
    fn method(&self) -> Method {
        Method::Energy
    }
    fn score(&self, outputs: Outputs<'_>) -> f32 {
        let t = f64::from(self.temperature);
        (t * log_sum_exp(outputs.preferred(), t)) as f32
    }
}

impl Scorer for Gen {
    fn method(&self) -> Method {
        self.method()
    }
    fn score(&self, outputs: Outputs<'_>) -> f32 {
        let z = outputs.preferred();
        let mut out = [f32::NAN];
        let batch = FeatureBatch {
            logits: z,
            features: &[],
            n: 1,
        };
        match self.score_batch(batch, &mut out) {
            Ok(()) => out[0],
            Err(_) => f32::NAN,
        }
    }
}

/// Builds the per-frame scorer of a logit method at temperature
/// `temperature`; `None` for the methods that score through [`Scorers`].
pub fn scorer(method: Method, temperature: f32) -> Option<Box<dyn Scorer>> {
    Some(match method {
        Method::Msp => Box::new(Msp { temperature }),
        Method::Odin => Box::new(Odin { temperature }),
        Method::MaxLogit => Box::new(MaxLogit),
        Method::Energy => Box::new(Energy { temperature }),
        Method::Gen { .. } => Box::new(Gen::for_method(method)?),
        _ => return None,
    })
}

/// Index of the largest logit; the first one on ties, as `torch.argmax`.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if *v > logits[best] {
            best = i;
        }
    }
    best
}

/// `max softmax(z / T)`, computed in f64 after subtracting the max: at
/// T = 1000 all probabilities sit near 1/K and f32 would lose the signal.
pub fn max_softmax(logits: &[f32], temperature: f32) -> f32 {
    let t = f64::from(temperature);
    let max = logits
        .iter()
        .map(|v| f64::from(*v))
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits
        .iter()
        .map(|v| ((f64::from(*v) - max) / t).exp())
        .sum();
    (1.0 / sum) as f32
}

/// `logsumexp(z / T)`, stably.
fn log_sum_exp(logits: &[f32], t: f64) -> f64 {
    let max = logits
        .iter()
        .map(|v| f64::from(*v) / t)
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = logits.iter().map(|v| (f64::from(*v) / t - max).exp()).sum();
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msp_matches_the_softmax_definition() {
        let z = [1.0f32, 2.0, 3.0];
        let e: Vec<f64> = z.iter().map(|v| f64::from(*v).exp()).collect();
        let want = e[2] / e.iter().sum::<f64>();
        assert!((f64::from(max_softmax(&z, 1.0)) - want).abs() < 1e-7);
        // Huge logits do not overflow.
        assert!((max_softmax(&[1000.0, 0.0], 1.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn high_temperature_flattens_towards_one_over_k() {
        let s = max_softmax(&[5.0, 0.0, -5.0, 1.0], 1000.0);
        assert!(s > 0.25 && s < 0.2525, "{s}");
    }

    #[test]
    fn energy_is_negated_free_energy() {
        let z = [0.5f32, -1.0, 2.0];
        let lse = z.iter().map(|v| f64::from(*v).exp()).sum::<f64>().ln();
        let outputs = Outputs {
            logits: &z,
            perturbed: None,
        };
        assert!((f64::from(Energy { temperature: 1.0 }.score(outputs)) - lse).abs() < 1e-6);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        let outputs = Outputs {
            logits: &[1.0, 3.0, -2.0],
            perturbed: Some(&[9.0, 0.0, 0.0]),
        };
        assert_eq!(MaxLogit.score(outputs), 3.0, "max-logit never perturbs");
    }

    #[test]
    fn odin_scores_the_perturbed_logits_and_msp_the_plain_ones() {
        let (plain, perturbed) = ([2.0f32, 0.0], [4.0f32, 0.0]);
        let outputs = Outputs {
            logits: &plain,
            perturbed: Some(&perturbed),
        };
        let at = |method| Scoring {
            method,
            temperature: 1.0,
            epsilon: 0.001,
        };
        assert_eq!(
            at(Method::Odin).score(outputs),
            max_softmax(&perturbed, 1.0)
        );
        assert_eq!(at(Method::Msp).score(outputs), max_softmax(&plain, 1.0));
        assert!(at(Method::Msp).perturbation().is_none());
        assert_eq!(at(Method::Msp).effective_epsilon(), 0.0);
        assert!(at(Method::Odin).perturbation().is_some());
        let no_step = Scoring {
            epsilon: 0.0,
            ..at(Method::Odin)
        };
        assert!(
            no_step.perturbation().is_none(),
            "ε = 0 needs no gradient run"
        );
    }

    #[test]
    fn methods_parse_from_their_names() {
        for m in [
            Method::Msp,
            Method::Odin,
            Method::MaxLogit,
            Method::Energy,
            Method::Knn { k: 10 },
            Method::Vim { dim: 0 },
            Method::Vim { dim: 32 },
            Method::Mds,
            Method::Rmds,
            Method::React { percentile: 9950 },
            Method::Fdbd,
            Method::Gen { gamma: 100, m: 10 },
            Method::Combined,
        ] {
            assert_eq!(m.as_str().parse::<Method>(), Ok(m), "{m}");
        }
        assert_eq!("knn".parse(), Ok(Method::Knn { k: 50 }));
        assert_eq!("knn:k=7".parse(), Ok(Method::Knn { k: 7 }));
        assert_eq!("react".parse(), Ok(Method::React { percentile: 9000 }));
        assert_eq!("react(p=99)".to_string(), "react(p=99)");
        assert_eq!(
            "gen".parse::<Method>().unwrap().to_string(),
            "gen(gamma=0.1,M=100)"
        );
        assert!("odinn".parse::<Method>().unwrap_err().contains("odinn"));
        assert!("knn(k=0)".parse::<Method>().is_err());
        assert!("knn(j=3)".parse::<Method>().unwrap_err().contains("\"j\""));
        assert!("react(p=120)".parse::<Method>().is_err());
        assert!("vim(dim=x)".parse::<Method>().is_err());
        // Every method but the baselines reads the perturbed frame.
        assert!(!Method::Msp.perturbs() && !Method::MaxLogit.perturbs());
        assert!(Method::Knn { k: 1 }.perturbs() && Method::Knn { k: 1 }.needs_features());
        assert!(Method::Gen { gamma: 1, m: 1 }.perturbs() && !Method::Odin.needs_features());
    }
}
