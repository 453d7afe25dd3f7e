//! Scoring: from a frame's logits to one number where higher means "more
//! in-distribution", for every method, so one rule `score >= threshold`
//! serves them all.
//!
//! The `Scorer` trait is the seam: the baseline methods here read the logits
//! of the frame itself; ODIN reuses `Msp` on the logits of the perturbed frame.

use std::fmt;
use std::str::FromStr;

/// A scoring method, as named on the CLI, in the card and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Maximum softmax probability at temperature T (Hendrycks & Gimpel 2017).
    Msp,
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
            "maxlogit" | "max-logit" => Ok(Method::MaxLogit),
            "energy" => Ok(Method::Energy),
            other => Err(format!(
                "unknown scoring method {other:?}: use msp, maxlogit or energy"
            )),
        }
    }
}

/// Turns one frame's logits into a score; higher = more in-distribution.
pub trait Scorer: Send + Sync {
    /// The method this scorer implements.
    fn method(&self) -> Method;
    /// The score of one frame's logits.
    fn score(&self, logits: &[f32]) -> f32;
}

/// Max softmax probability at temperature `T`.
#[derive(Debug, Clone, Copy)]
pub struct Msp {
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
    fn score(&self, logits: &[f32]) -> f32 {
        max_softmax(logits, self.temperature)
    }
}

impl Scorer for MaxLogit {
    fn method(&self) -> Method {
        Method::MaxLogit
    }
    fn score(&self, logits: &[f32]) -> f32 {
        logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }
}

impl Scorer for Energy {
    fn method(&self) -> Method {
        Method::Energy
    }
    fn score(&self, logits: &[f32]) -> f32 {
        let t = f64::from(self.temperature);
        (t * log_sum_exp(logits, t)) as f32
    }
}

/// Builds the scorer for `method` at temperature `temperature`.
pub fn scorer(method: Method, temperature: f32) -> Box<dyn Scorer> {
    match method {
        Method::Msp => Box::new(Msp { temperature }),
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
        assert!((f64::from(Energy { temperature: 1.0 }.score(&z)) - lse).abs() < 1e-6);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(MaxLogit.score(&[1.0, 3.0, -2.0]), 3.0);
    }

    #[test]
    fn methods_parse_from_their_names() {
        for m in [Method::Msp, Method::MaxLogit, Method::Energy] {
            assert_eq!(m.as_str().parse::<Method>(), Ok(m));
        }
        assert!("odinn".parse::<Method>().unwrap_err().contains("odinn"));
    }
}
