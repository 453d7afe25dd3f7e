//! Generalized entropy (Liu, Lochman & Zach, CVPR 2023), as OpenOOD's
//! `gen_postprocessor.py`.

use super::{argmax, Detector, DetectorError, FeatureBatch};

/// GEN: `score(z) = −Σ_{j ∈ top-M} p_j^γ (1 − p_j)^γ`, `p = softmax(z)`.
///
/// OpenOOD v1.5 `gen_postprocessor.py`: `softmax` (l. 20), the M largest
/// probabilities `sort(probs)[:, -M:]` (l. 34), the sum (l. 35–36) and
/// `return -scores` (l. 38). Defaults γ = 0.1, M = 100
/// (`configs/postprocessors/gen.yml`); M ≥ K takes every class. Needs only
/// the logits (no statistics). `1 − p` of the top class is computed as the
/// sum of the others (no cancellation when p → 1).
#[derive(Debug, Clone)]
pub struct Gen {
    k: usize,
    gamma: f64,
    m: usize,
}

impl Gen {
    /// GEN for `num_classes` logits with exponent `gamma` (> 0) over the top
    /// `m` (≥ 1) probabilities.
    pub fn new(num_classes: usize, gamma: f64, m: usize) -> Result<Self, DetectorError> {
        if num_classes == 0 {
            return Err(DetectorError::Param {
                name: "num_classes",
                value: "0".into(),
                reason: "must be positive".into(),
            });
        }
        if !(gamma > 0.0 && gamma.is_finite()) {
            return Err(DetectorError::Param {
                name: "gamma",
                value: gamma.to_string(),
                reason: "must be positive and finite".into(),
            });
        }
        if m == 0 {
            return Err(DetectorError::Param {
                name: "M",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            k: num_classes,
            gamma,
            m: m.min(num_classes),
        })
    }
}

impl Gen {
    /// GEN for a `gen(...)` method with K classes still unknown: K is taken
    /// from the logits of each call.
    pub fn for_method(method: super::Method) -> Option<Self> {
        match method {
            super::Method::Gen { gamma, m } => Some(Self {
                k: 0,
                gamma: f64::from(gamma) / 1000.0,
                m: m as usize,
            }),
            _ => None,
        }
    }

    /// The method this detector computes.
    pub fn method(&self) -> super::Method {
        super::Method::Gen {
            gamma: (self.gamma * 1000.0).round() as u32,
            m: self.m as u32,
        }
    }
}

impl Detector for Gen {
    fn name(&self) -> &'static str {
        "gen"
    }

    fn tag(&self) -> String {
        format!("gen(gamma={},M={})", self.gamma, self.m)
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        // K = 0: taken from the batch (a GEN built from a method name).
        let k = if self.k == 0 && batch.n > 0 {
            batch.logits.len() / batch.n
        } else {
            self.k
        };
        batch.check(out, Some(k), None)?;
        let mut e = vec![0.0f64; k];
        for (i, o) in out.iter_mut().enumerate() {
            let z = batch.logits_row(i, k);
            let top = argmax(z);
            let max = f64::from(z[top]);
            for (e, z) in e.iter_mut().zip(z) {
                *e = (f64::from(*z) - max).exp();
            }
            let others: f64 = e
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != top)
                .map(|(_, v)| v)
                .sum();
            let total = e[top] + others;
            // (p, term) per class; the top class's 1 − p is others / total.
            let mut probs: Vec<(f64, f64)> = e
                .iter()
                .enumerate()
                .map(|(j, ej)| {
                    let p = ej / total;
                    let q = if j == top { others / total } else { 1.0 - p };
                    (p, p.powf(self.gamma) * q.powf(self.gamma))
                })
                .collect();
            let score = if self.m >= k || k == 0 {
                probs.iter().map(|t| t.1).sum::<f64>()
            } else {
                probs.sort_by(|a, b| b.0.total_cmp(&a.0));
                probs[..self.m.min(k)].iter().map(|t| t.1).sum::<f64>()
            };
            *o = if z.iter().any(|v| v.is_nan()) {
                f32::NAN
            } else {
                (-score) as f32
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_matches_the_definition() {
        let z = [2.0f32, 0.5, -1.0];
        let e: Vec<f64> = z.iter().map(|v| f64::from(*v).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let term = |p: f64| p.powf(0.1) * (1.0 - p).powf(0.1);
        let mut out = [0.0f32];
        let batch = FeatureBatch {
            logits: &z,
            features: &[],
            n: 1,
        };
        Gen::new(3, 0.1, 100)
            .unwrap()
            .score_batch(batch, &mut out)
            .unwrap();
        let want = -(term(p[0]) + term(p[1]) + term(p[2]));
        assert!((f64::from(out[0]) - want).abs() < 1e-6 * want.abs());
        // M = 2: the two largest probabilities.
        Gen::new(3, 0.1, 2)
            .unwrap()
            .score_batch(batch, &mut out)
            .unwrap();
        assert!((f64::from(out[0]) + term(p[0]) + term(p[1])).abs() < 1e-6);
        // A confident frame scores higher than a flat one.
        let mut flat = [0.0f32];
        let fb = FeatureBatch {
            logits: &[0.0, 0.0, 0.0],
            features: &[],
            n: 1,
        };
        Gen::new(3, 0.1, 100)
            .unwrap()
            .score_batch(fb, &mut flat)
            .unwrap();
        Gen::new(3, 0.1, 100)
            .unwrap()
            .score_batch(batch, &mut out)
            .unwrap();
        assert!(out[0] > flat[0]);
        assert!(Gen::new(3, 0.0, 1).is_err() && Gen::new(3, 0.1, 0).is_err());
    }
}
