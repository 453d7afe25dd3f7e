//! Scoring: from a frame's logits to one number where higher means "more
//! in-distribution", for every method, so one rule `score >= threshold`
//! serves them all.
//!
//! The `Scorer` trait is the seam: each method reads the engine's `Outputs`,
//! the logits of the frame itself and, when the frame was perturbed (ODIN,
//! or energy with input preprocessing), the logits of the perturbed frame.

mod combine;
mod detector;
mod fdbd;
mod gen;
mod knn;
mod mahalanobis;
mod react;
mod vim;

use std::fmt;
use std::str::FromStr;

pub use combine::{calibrate as score_norm, Combined, ScoreNorm};
pub(crate) use detector::{lse, to_f64};
pub use detector::{Detector, DetectorError, FeatureBatch};
pub use fdbd::{Fdbd, FdbdNormalizer};
pub use gen::Gen;
pub use knn::{Knn, BLOCK_ROWS as KNN_BLOCK_ROWS};
pub use mahalanobis::{Mds, Rmds};
pub use react::React;
pub use vim::Vim;

/// A scoring method, as named on the CLI, in the card and on the wire.
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
}

impl Method {
    /// The name used on the CLI and in verdicts.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Msp => "msp",
            Method::Odin => "odin",
            Method::MaxLogit => "maxlogit",
            Method::Energy => "energy",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "msp" => Ok(Method::Msp),
            "odin" => Ok(Method::Odin),
            "maxlogit" | "max-logit" => Ok(Method::MaxLogit),
            "energy" => Ok(Method::Energy),
            other => Err(format!(
                "unknown scoring method {other:?}: use msp, odin, energy or maxlogit"
            )),
        }
    }
}

impl Method {
    /// Whether this method uses the perturbed input when ε > 0.
    pub fn perturbs(self) -> bool {
        matches!(self, Method::Odin | Method::Energy)
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
    fn preferred(&self) -> &'a [f32] {
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

    /// Scores one frame's outputs.
    pub fn score(&self, outputs: Outputs<'_>) -> f32 {
        scorer(self.method, self.temperature).score(outputs)
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

/// Builds the scorer for `method` at temperature `temperature`.
pub fn scorer(method: Method, temperature: f32) -> Box<dyn Scorer> {
    match method {
        Method::Msp => Box::new(Msp { temperature }),
        Method::Odin => Box::new(Odin { temperature }),
        Method::MaxLogit => Box::new(MaxLogit),
        Method::Energy => Box::new(Energy { temperature }),
    }
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
        for m in [Method::Msp, Method::Odin, Method::MaxLogit, Method::Energy] {
            assert_eq!(m.as_str().parse::<Method>(), Ok(m));
        }
        assert!("odinn".parse::<Method>().unwrap_err().contains("odinn"));
    }
}
