//! `calibrate --auto`: the search over detectors and their hyper-parameters
//! on the tuning split, keeping the lowest FPR at the calibration TPR on the
//! pooled out-of-distribution tuning images.
//!
//! Candidates, each scored on every tuning image:
//!
//! * on the frames as sent: msp at every T of the grid, maxlogit, energy,
//!   GEN, and every feature detector (knn for several k, vim for several D,
//!   mds, rmds, react at each fitted percentile, fdbd) with each clean fit
//!   statistics file;
//! * at every (T, ε > 0) of ODIN's grid, on the perturbed frames: ODIN,
//!   energy, GEN and the same feature detectors;
//! * with `--train`, the feature detectors with statistics of training
//!   features perturbed at the best ODIN point (fitted during the search);
//! * weighted sums `w·z(A) + (1 − w)·z(B)` of the best single candidates
//!   that share one perturbation, each part z-scored against its scores on
//!   the in-distribution tuning images.
//!
//! Each T costs one run of the fused graph per batch (its gradient sign does
//! not depend on ε, so the step of every ε is rebuilt exactly from it: the
//! ±1/std of the graph, times ε), each ε one forward run that gives logits
//! and features; every candidate at that point is scored from them.

use std::sync::Arc;

use super::metrics;
use super::sets::Set;
use crate::engine::{Engine, EngineError};
use crate::score::{
    BatchView, LoadedStats, Method, Perturbation, ScoreError, Scorers, StatsChoice,
};

/// Images per engine run.
const BATCH: usize = 128;

/// What the search tries.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    /// ODIN's temperatures.
    pub temperatures: Vec<f32>,
    /// ODIN's ε grid (0 included).
    pub epsilons: Vec<f32>,
    /// KNN's k values.
    pub knn_ks: Vec<usize>,
    /// ViM's principal dimensions (0: the fitted default).
    pub vim_dims: Vec<usize>,
    /// GEN's (γ in thousandths, M).
    pub gen: Vec<(u32, u32)>,
    /// Single candidates that enter the pairwise combinations.
    pub combine_top: usize,
    /// Weights w of `w·z(A) + (1 − w)·z(B)`.
    pub weights: Vec<f64>,
    /// The calibration TPR.
    pub tpr: f64,
}

impl SearchOptions {
    /// The default search for a model with features of dimension `dim`.
    pub fn new(dim: Option<usize>, temperatures: Vec<f32>, epsilons: Vec<f32>, tpr: f64) -> Self {
        let mut vim_dims = vec![0];
        if let Some(d) = dim {
            for v in [d / 8, d / 4, d / 2, 3 * d / 4] {
                if v > 0 && v < d && !vim_dims.contains(&v) {
                    vim_dims.push(v);
                }
            }
        }
        SearchOptions {
            temperatures,
            epsilons,
            knn_ks: vec![1, 5, 10, 20, 50, 100, 200],
            vim_dims,
            gen: vec![(10, 10), (100, 10), (500, 10)],
            combine_top: 16,
            weights: (1..10).map(|i| f64::from(i) / 10.0).collect(),
            tpr,
        }
    }
}

/// One single detector of the search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec {
    /// The method.
    pub method: Method,
    /// Its softmax temperature (msp, odin, energy; 1 otherwise).
    pub temperature: f32,
    /// The perturbation it reads, if any.
    pub perturbation: Option<Perturbation>,
    /// The fit statistics it uses (feature detectors), by index.
    pub stats: Option<usize>,
}

impl Spec {
    /// A label for tables, e.g. `knn(k=10) @ T=100 ε=0.0032 [bank: perturbed]`.
    pub fn label(&self, stats: &[Arc<LoadedStats>]) -> String {
        let mut s = match self.method {
            Method::Msp | Method::Odin | Method::Energy => {
                format!("{} T={}", self.method, self.temperature)
            }
            m => m.to_string(),
        };
        if let Some(p) = self.perturbation {
            if !matches!(self.method, Method::Odin) {
                s += &format!(" on perturbed (T={}, ε={})", p.temperature, p.epsilon);
            } else {
                s += &format!(" ε={}", p.epsilon);
            }
        }
        if let Some(i) = self.stats {
            if stats[i].perturbation().is_some() {
                s += " [perturbed training features]";
            }
        }
        s
    }
}

/// A candidate's scores on the tuning images.
#[derive(Debug, Clone)]
pub struct Scored {
    /// What was scored.
    pub spec: Spec,
    /// In-distribution scores.
    pub id: Vec<f32>,
    /// Pooled out-of-distribution scores.
    pub ood: Vec<f32>,
}

/// A candidate's quality on the tuning split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quality {
    /// FPR at the calibration TPR (lower is better).
    pub fpr: f64,
    /// AUROC (the tie-break).
    pub auroc: f64,
}

impl Quality {
    /// Measures scores.
    pub fn of(id: &[f32], ood: &[f32], tpr: f64) -> Quality {
        let threshold = metrics::threshold_at_tpr(id, tpr);
        Quality {
            fpr: metrics::fraction_kept(ood, threshold),
            auroc: metrics::auroc(id, ood),
        }
    }

    /// Whether `self` beats `other`: lower FPR, then higher AUROC.
    pub fn better(&self, other: &Quality) -> bool {
        self.fpr < other.fpr || (self.fpr == other.fpr && self.auroc > other.auroc)
    }
}

/// The detector the search chose.
#[derive(Debug, Clone)]
pub enum Choice {
    /// One detector.
    Single(Spec),
    /// `weight·z(a) + (1 − weight)·z(b)`.
    Pair {
        /// First part.
        a: Spec,
        /// Second part.
        b: Spec,
        /// Weight of `a`.
        weight: f64,
    },
}

impl Choice {
    /// The perturbation the detector needs (one for both parts).
    pub fn perturbation(&self) -> Option<Perturbation> {
        match self {
            Choice::Single(s) => s.perturbation,
            Choice::Pair { a, b, .. } => a.perturbation.or(b.perturbation),
        }
    }

    /// A label for tables.
    pub fn label(&self, stats: &[Arc<LoadedStats>]) -> String {
        match self {
            Choice::Single(s) => s.label(stats),
            Choice::Pair { a, b, weight } => format!(
                "{:.1}·z({}) + {:.1}·z({})",
                weight,
                a.label(stats),
                1.0 - weight,
                b.label(stats)
            ),
        }
    }
}

/// The search's state: every candidate scored so far.
#[derive(Debug)]
pub struct Search {
    /// The options.
    pub options: SearchOptions,
    /// Statistics the feature detectors use.
    pub stats: Vec<Arc<LoadedStats>>,
    /// Scores of every single candidate.
    pub scored: Vec<Scored>,
    scorers: Scorers,
}

/// Why the search failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A detector failed.
    #[error(transparent)]
    Score(#[from] ScoreError),
}

/// Exactly the perturbed batch of the fused graph at ε: `x − ε·s`, with
/// `s = ±1/std` per channel taken from the sign of `x − unit`, where `unit`
/// is the graph's `perturbed` output at ε = 1.
pub fn perturbed_at(x: &[f32], signs: &[f32], epsilon: f32) -> Vec<f32> {
    x.iter().zip(signs).map(|(x, s)| x - epsilon * s).collect()
}

/// `s = ±(1/std_c)` per element of an NCHW batch, from the graph's output
/// at ε = 1.
pub fn signs(x: &[f32], unit: &[f32], std: &[f32], chw: [usize; 3]) -> Vec<f32> {
    let [c, h, w] = chw;
    let plane = h * w;
    x.iter()
        .zip(unit)
        .enumerate()
        .map(|(i, (x, u))| {
            let ch = (i / plane) % c;
            let inv = 1.0f32 / std[ch.min(std.len() - 1)];
            if x - u >= 0.0 {
                inv
            } else {
                -inv
            }
        })
        .collect()
}

impl Search {
    /// A search over `stats`.
    pub fn new(options: SearchOptions, stats: Vec<Arc<LoadedStats>>, dim: Option<usize>) -> Self {
        Search {
            scorers: Scorers::new(stats.clone(), None, dim),
            options,
            stats,
            scored: Vec::new(),
        }
    }

    /// The candidates at one point: `None` for the frames as sent.
    fn specs(&self, point: Option<Perturbation>, only_stats: Option<usize>) -> Vec<Spec> {
        let o = &self.options;
        let mut specs = Vec::new();
        let spec = |method, temperature, stats| Spec {
            method,
            temperature,
            perturbation: point,
            stats,
        };
        if only_stats.is_none() {
            match point {
                None => {
                    for &t in &o.temperatures {
                        specs.push(spec(Method::Msp, t, None));
                    }
                    specs.push(spec(Method::MaxLogit, 1.0, None));
                    specs.push(spec(Method::Energy, 1.0, None));
                }
                Some(p) => {
                    specs.push(spec(Method::Odin, p.temperature, None));
                    specs.push(spec(Method::Energy, p.temperature, None));
                }
            }
            for &(gamma, m) in &o.gen {
                specs.push(spec(Method::Gen { gamma, m }, 1.0, None));
            }
        }
        if self.scorers.dim().is_none() {
            return specs;
        }
        for (i, s) in self.stats.iter().enumerate() {
            if only_stats.is_some_and(|j| j != i) {
                continue;
            }
            if !(s.fitted_under(None) || s.fitted_under(point)) {
                continue;
            }
            if s.stats.bank_rows() > 0 {
                for &k in &o.knn_ks {
                    if k <= s.stats.bank_rows() {
                        specs.push(spec(Method::Knn { k: k as u32 }, 1.0, Some(i)));
                    }
                }
            }
            for &d in &o.vim_dims {
                specs.push(spec(Method::Vim { dim: d as u32 }, 1.0, Some(i)));
            }
            specs.push(spec(Method::Mds, 1.0, Some(i)));
            specs.push(spec(Method::Rmds, 1.0, Some(i)));
            for p in &s.stats.react_percentiles {
                specs.push(spec(
                    Method::React {
                        percentile: (p * 100.0).round() as u32,
                    },
                    1.0,
                    Some(i),
                ));
            }
            specs.push(spec(Method::Fdbd, 1.0, Some(i)));
        }
        specs
    }

    /// Scores the candidates of one point on a batch and appends them
    /// (`first` is the index in `scored` where this point's candidates
    /// start, `None` the first time).
    fn score_point(
        &mut self,
        point: Option<Perturbation>,
        only_stats: Option<usize>,
        view: &BatchView<'_>,
        ood: bool,
        first: &mut Option<usize>,
    ) -> Result<(), SearchError> {
        let specs = self.specs(point, only_stats);
        let start = *first.get_or_insert_with(|| {
            let start = self.scored.len();
            self.scored.extend(specs.iter().map(|&spec| Scored {
                spec,
                id: Vec::new(),
                ood: Vec::new(),
            }));
            start
        });
        let n = view.n;
        let perturbed = point.is_some();
        // One KNN search per statistics file answers every k.
        let mut nearest: Vec<Option<Vec<Option<Vec<f64>>>>> = vec![None; self.stats.len()];
        for (j, spec) in specs.iter().enumerate() {
            let mut out = vec![f32::NAN; n];
            match (spec.method, spec.stats) {
                (Method::Knn { k }, Some(i)) => {
                    if nearest[i].is_none() {
                        let k_max = specs
                            .iter()
                            .filter(|s| s.stats == Some(i))
                            .filter_map(|s| match s.method {
                                Method::Knn { k } => Some(k as usize),
                                _ => None,
                            })
                            .max()
                            .unwrap_or(1);
                        let features = if perturbed {
                            view.perturbed_features
                        } else {
                            view.features
                        }
                        .unwrap_or_default();
                        let bank = self.stats[i]
                            .knn_bank()
                            .map_err(|e| SearchError::Score(e.into()))?;
                        nearest[i] = Some(
                            bank.nearest(features, n, k_max)
                                .map_err(|e| SearchError::Score(e.into()))?,
                        );
                    }
                    if let Some(lists) = &nearest[i] {
                        for (o, d) in out.iter_mut().zip(lists) {
                            *o = d.as_ref().map_or(f32::NAN, |d| (-d[k as usize - 1]) as f32);
                        }
                    }
                }
                (method, stats) => self.scorers.score_part(
                    method,
                    spec.temperature,
                    perturbed,
                    stats.map_or(StatsChoice::Auto, StatsChoice::Index),
                    point,
                    view,
                    &mut out,
                )?,
            }
            let scored = &mut self.scored[start + j];
            if ood {
                scored.ood.extend_from_slice(&out);
            } else {
                scored.id.extend_from_slice(&out);
            }
        }
        Ok(())
    }

    /// Runs the grid over one set (in-distribution or not): the frames as
    /// sent, then every (T, ε > 0). `firsts` remembers where each point's
    /// candidates are; `progress(images)` after each T of each batch.
    #[allow(clippy::too_many_arguments)]
    pub fn run_grid(
        &mut self,
        engine: &mut Engine,
        set: &Set,
        ood: bool,
        std: &[f32],
        chw: [usize; 3],
        firsts: &mut Vec<Option<usize>>,
        mut progress: impl FnMut(usize),
    ) -> Result<(), SearchError> {
        let temperatures = self.options.temperatures.clone();
        let epsilons: Vec<f32> = self
            .options
            .epsilons
            .iter()
            .copied()
            .filter(|e| *e > 0.0)
            .collect();
        let points = 1 + temperatures.len() * epsilons.len();
        if firsts.len() < points {
            firsts.resize(points, None);
        }
        let len = set.inputs.len() / set.n;
        for chunk in set.inputs.chunks(BATCH * len) {
            let n = chunk.len() / len;
            let (logits, features) = engine.forward(chunk, n)?;
            let clean = BatchView {
                n,
                logits: &logits,
                features: features.as_deref(),
                perturbed_logits: None,
                perturbed_features: None,
            };
            self.score_point(None, None, &clean, ood, &mut firsts[0])?;
            for (ti, &temperature) in temperatures.iter().enumerate() {
                let (_, unit) = engine.perturb(
                    chunk,
                    n,
                    Perturbation {
                        temperature,
                        epsilon: 1.0,
                    },
                )?;
                let s = signs(chunk, &unit, std, chw);
                for (ei, &epsilon) in epsilons.iter().enumerate() {
                    let x = perturbed_at(chunk, &s, epsilon);
                    let (pl, pf) = engine.forward(&x, n)?;
                    let view = BatchView {
                        n,
                        logits: &logits,
                        features: features.as_deref(),
                        perturbed_logits: Some(&pl),
                        perturbed_features: pf.as_deref(),
                    };
                    let point = Perturbation {
                        temperature,
                        epsilon,
                    };
                    let index = 1 + ti * epsilons.len() + ei;
                    self.score_point(Some(point), None, &view, ood, &mut firsts[index])?;
                }
                progress(n);
            }
        }
        Ok(())
    }

    /// Scores the feature detectors of statistics `stats` at `point` on one
    /// set (one fused run per batch).
    pub fn run_point(
        &mut self,
        engine: &mut Engine,
        set: &Set,
        ood: bool,
        point: Perturbation,
        stats: usize,
        first: &mut Option<usize>,
    ) -> Result<(), SearchError> {
        let len = set.inputs.len() / set.n;
        for chunk in set.inputs.chunks(BATCH * len) {
            let n = chunk.len() / len;
            let out = engine.run(chunk, n, Some(point))?;
            let view = BatchView {
                n,
                logits: &out.logits,
                features: out.features.as_deref(),
                perturbed_logits: out.perturbed_logits.as_deref(),
                perturbed_features: out.perturbed_features.as_deref(),
            };
            self.score_point(Some(point), Some(stats), &view, ood, first)?;
        }
        Ok(())
    }

    /// Adds statistics (e.g. fitted during the search) and returns their index.
    pub fn add_stats(&mut self, stats: Arc<LoadedStats>, dim: Option<usize>) -> usize {
        self.stats.push(stats);
        self.scorers = Scorers::new(self.stats.clone(), None, dim);
        self.stats.len() - 1
    }

    /// Every single candidate with its quality, best first.
    pub fn ranked(&self) -> Vec<(usize, Quality)> {
        let tpr = self.options.tpr;
        let mut ranked: Vec<(usize, Quality)> = self
            .scored
            .iter()
            .enumerate()
            .filter(|(_, s)| s.id.len() > 1 && s.id.iter().chain(&s.ood).all(|v| v.is_finite()))
            .map(|(i, s)| (i, Quality::of(&s.id, &s.ood, tpr)))
            .collect();
        ranked.sort_by(|a, b| {
            a.1.fpr
                .total_cmp(&b.1.fpr)
                .then(b.1.auroc.total_cmp(&a.1.auroc))
        });
        ranked
    }

    /// The best ODIN candidate (for the perturbed fit).
    pub fn best_odin(&self) -> Option<Spec> {
        self.ranked()
            .into_iter()
            .map(|(i, _)| self.scored[i].spec)
            .find(|s| s.method == Method::Odin && s.perturbation.is_some())
    }

    /// Pairs of the best single candidates (and the best ODIN), weighted,
    /// that share one perturbation; every pair tried, best first.
    pub fn pairs(&self) -> Vec<(Choice, Quality, [crate::score::ScoreNorm; 2])> {
        let ranked = self.ranked();
        let tpr = self.options.tpr;
        let mut top: Vec<usize> = Vec::new();
        for (i, _) in &ranked {
            // Distinct methods at distinct points, so the pool is varied.
            let s = &self.scored[*i].spec;
            let same = top.iter().any(|j| {
                let t = &self.scored[*j].spec;
                t.method.name() == s.method.name()
                    && t.perturbation.map(|p| p.key()) == s.perturbation.map(|p| p.key())
                    && t.stats == s.stats
            });
            if !same {
                top.push(*i);
            }
            if top.len() >= self.options.combine_top {
                break;
            }
        }
        // The best ODIN point and the best candidates at it join the pool.
        if let Some(odin) = self.best_odin() {
            let key = odin.perturbation.map(|p| p.key());
            let mut at: Vec<usize> = ranked
                .iter()
                .map(|(i, _)| *i)
                .filter(|i| self.scored[*i].spec.perturbation.map(|p| p.key()) == key)
                .take(self.options.combine_top / 2)
                .collect();
            at.retain(|i| !top.contains(i));
            top.extend(at);
        }
        let norm = |v: &[f32]| {
            let n = v.len() as f64;
            let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
            let var = v
                .iter()
                .map(|x| (f64::from(*x) - mean).powi(2))
                .sum::<f64>()
                / n;
            crate::score::ScoreNorm {
                mean,
                std: var.sqrt(),
                n: v.len() as u64,
            }
        };
        let mut out = Vec::new();
        for (ai, &a) in top.iter().enumerate() {
            for &b in &top[ai + 1..] {
                let (sa, sb) = (&self.scored[a], &self.scored[b]);
                let (pa, pb) = (sa.spec.perturbation, sb.spec.perturbation);
                if let (Some(pa), Some(pb)) = (pa, pb) {
                    if pa.key() != pb.key() {
                        continue;
                    }
                }
                let (na, nb) = (norm(&sa.id), norm(&sb.id));
                if !(na.std > 0.0 && nb.std > 0.0) {
                    continue;
                }
                for &w in &self.options.weights {
                    let mix = |x: &[f32], y: &[f32]| -> Vec<f32> {
                        x.iter()
                            .zip(y)
                            .map(|(x, y)| {
                                (w * na.z(f64::from(*x)) + (1.0 - w) * nb.z(f64::from(*y))) as f32
                            })
                            .collect()
                    };
                    let q = Quality::of(&mix(&sa.id, &sb.id), &mix(&sa.ood, &sb.ood), tpr);
                    out.push((
                        Choice::Pair {
                            a: sa.spec,
                            b: sb.spec,
                            weight: w,
                        },
                        q,
                        [na, nb],
                    ));
                }
            }
        }
        out.sort_by(|a, b| {
            a.1.fpr
                .total_cmp(&b.1.fpr)
                .then(b.1.auroc.total_cmp(&a.1.auroc))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_rebuild_the_graphs_step_exactly() {
        // One image, 2 channels of 2 pixels; std (0.5, 0.25).
        let std = [0.5f32, 0.25];
        let x = [0.1f32, -0.3, 2.0, 0.0];
        let s_true = [2.0f32, -2.0, -4.0, 4.0];
        let unit: Vec<f32> = x.iter().zip(&s_true).map(|(x, s)| x - s).collect();
        let s = signs(&x, &unit, &std, [2, 1, 2]);
        assert_eq!(s, s_true);
        let e = 0.0014f32;
        let p = perturbed_at(&x, &s, e);
        for i in 0..4 {
            assert_eq!(p[i], x[i] - e * s_true[i]);
        }
    }

    #[test]
    fn quality_prefers_lower_fpr_then_higher_auroc() {
        let a = Quality {
            fpr: 0.3,
            auroc: 0.8,
        };
        let b = Quality {
            fpr: 0.3,
            auroc: 0.9,
        };
        assert!(b.better(&a) && !a.better(&b));
        let id: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let ood: Vec<f32> = (0..100).map(|i| i as f32 - 50.0).collect();
        let q = Quality::of(&id, &ood, 0.95);
        // δ keeps 95 of 100 ID scores: δ = 5, and OOD scores 5..49 pass.
        assert!((q.fpr - 0.45).abs() < 1e-12, "{q:?}");
    }
}
