//! What a served generation scores with: the loaded fit statistics, the
//! calibrated combination, and the detectors built from them (once, then
//! cached). Scores a whole batch at once: the engine worker calls it after
//! the batch's run, so the KNN search is one GEMM per block of the bank for
//! all the batch's frames.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::{
    max_softmax, Detector, DetectorError, Fdbd, FdbdNormalizer, FeatureBatch, Gen, Knn, KnnBank,
    Mds, Method, Perturbation, React, Rmds, ScoreNorm, Scoring, Vim,
};
use crate::fit::{FitPerturbation, Stats};

/// Fit statistics loaded for serving, with the KNN bank prepared on first
/// use.
#[derive(Debug)]
pub struct LoadedStats {
    /// The statistics.
    pub stats: Stats,
    /// Where they came from, for messages and `GetModelInfo` (a file name
    /// and the start of its SHA-256, never a server path).
    pub name: String,
    /// SHA-256 (hex) of the file.
    pub sha256: String,
    knn: OnceLock<Result<Arc<KnnBank>, DetectorError>>,
}

impl LoadedStats {
    /// Wraps statistics read from the file called `name` with digest `sha256`.
    pub fn new(stats: Stats, name: impl Into<String>, sha256: impl Into<String>) -> Self {
        LoadedStats {
            stats,
            name: name.into(),
            sha256: sha256.into(),
            knn: OnceLock::new(),
        }
    }

    /// The perturbation the training features were taken under.
    pub fn perturbation(&self) -> Option<FitPerturbation> {
        self.stats.meta.perturbation
    }

    /// The KNN bank, prepared once.
    pub fn knn_bank(&self) -> Result<Arc<KnnBank>, DetectorError> {
        self.knn
            .get_or_init(|| KnnBank::new(&self.stats).map(Arc::new))
            .clone()
    }

    /// Whether these statistics were fitted on features perturbed by `p`
    /// (`None`: on clean images).
    pub fn fitted_under(&self, p: Option<Perturbation>) -> bool {
        match (self.perturbation(), p) {
            (None, None) => true,
            (Some(f), Some(p)) => f.temperature == p.temperature && f.epsilon == p.epsilon,
            _ => false,
        }
    }
}

/// A batch's engine outputs, row-major: what every method reads.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Frames.
    pub n: usize,
    /// `n × K` logits of the frames as sent.
    pub logits: &'a [f32],
    /// `n × D` features of the frames as sent, when tapped.
    pub features: Option<&'a [f32]>,
    /// `n × K` logits of the perturbed frames, when perturbed.
    pub perturbed_logits: Option<&'a [f32]>,
    /// `n × D` features of the perturbed frames, when perturbed and tapped.
    pub perturbed_features: Option<&'a [f32]>,
}

impl<'a> BatchView<'a> {
    fn logits(&self, perturbed: bool) -> Result<&'a [f32], ScoreError> {
        if perturbed {
            self.perturbed_logits
                .ok_or_else(|| ScoreError::Unavailable("the batch was not perturbed".into()))
        } else {
            Ok(self.logits)
        }
    }

    fn features(&self, perturbed: bool) -> Result<&'a [f32], ScoreError> {
        let f = if perturbed {
            self.perturbed_features
        } else {
            self.features
        };
        f.ok_or_else(|| {
            ScoreError::Unavailable(
                "the model's penultimate features were not computed (no feature taps)".into(),
            )
        })
    }
}

/// Which statistics a part of a combination scores with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsChoice {
    /// Those fitted under the frame's perturbation, else the clean ones.
    Auto,
    /// The loaded statistics with this index.
    Index(usize),
}

/// One z-scored part of a combination.
#[derive(Debug, Clone, PartialEq)]
pub struct CombinationPart {
    /// The method (never `combined`).
    pub method: Method,
    /// Its softmax temperature (msp, odin, energy).
    pub temperature: f32,
    /// Whether it reads the perturbed frame.
    pub perturbed: bool,
    /// Its weight.
    pub weight: f64,
    /// Mean and std of its scores on in-distribution validation frames.
    pub norm: ScoreNorm,
    /// Which statistics it uses (feature detectors).
    pub stats: StatsChoice,
}

/// `Σ_i w_i · (s_i − mean_i) / std_i` over parts scored from one engine run
/// (one perturbation, shared).
#[derive(Debug, Clone, PartialEq)]
pub struct Combination {
    /// The perturbation the parts that read perturbed frames need.
    pub perturbation: Option<Perturbation>,
    /// The parts.
    pub parts: Vec<CombinationPart>,
}

impl Combination {
    /// A one-line description, e.g.
    /// `0.7·z(odin T=100, perturbed) + 0.3·z(knn(k=10), perturbed)`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| {
                let t = if matches!(p.method, Method::Msp | Method::Odin | Method::Energy) {
                    format!(" T={}", p.temperature)
                } else {
                    String::new()
                };
                let input = if p.perturbed { ", perturbed" } else { "" };
                format!("{}·z({}{t}{input})", p.weight, p.method)
            })
            .collect();
        let at = self
            .perturbation
            .map(|p| format!(" at T={}, ε={}", p.temperature, p.epsilon))
            .unwrap_or_default();
        format!("{}{at}", parts.join(" + "))
    }
}

/// Why a frame cannot be scored as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    /// The method needs something this server did not load.
    #[error("{0}")]
    Unavailable(String),
    /// A detector failed (a buffer of the wrong size: a bug).
    #[error(transparent)]
    Detector(#[from] DetectorError),
}

/// The statistics, combination and detectors of one served generation.
pub struct Scorers {
    stats: Vec<Arc<LoadedStats>>,
    combination: Option<Combination>,
    dim: Option<usize>,
    cache: Mutex<HashMap<(Method, usize), Arc<dyn Detector>>>,
}

impl std::fmt::Debug for Scorers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scorers")
            .field(
                "stats",
                &self.stats.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("combination", &self.combination)
            .field("dim", &self.dim)
            .finish()
    }
}

impl Default for Scorers {
    fn default() -> Self {
        Scorers::new(Vec::new(), None, None)
    }
}

impl Scorers {
    /// Scorers over `stats` with an optional calibrated `combination`, for
    /// a model whose features have dimension `dim` (`None`: not tapped).
    pub fn new(
        stats: Vec<Arc<LoadedStats>>,
        combination: Option<Combination>,
        dim: Option<usize>,
    ) -> Scorers {
        Scorers {
            stats,
            combination,
            dim,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The model's feature dimension, when tapped.
    pub fn dim(&self) -> Option<usize> {
        self.dim
    }

    /// The loaded statistics.
    pub fn stats(&self) -> &[Arc<LoadedStats>] {
        &self.stats
    }

    /// The calibrated combination, if any.
    pub fn combination(&self) -> Option<&Combination> {
        self.combination.as_ref()
    }

    /// The statistics a feature detector uses under `perturbation`: those
    /// fitted on training features perturbed the same way, else those of
    /// clean training features.
    pub fn stats_for(&self, perturbation: Option<Perturbation>) -> Option<usize> {
        let exact = self.stats.iter().position(|s| s.fitted_under(perturbation));
        exact.or_else(|| self.stats.iter().position(|s| s.fitted_under(None)))
    }

    fn choose(
        &self,
        choice: StatsChoice,
        perturbation: Option<Perturbation>,
    ) -> Result<usize, ScoreError> {
        match choice {
            StatsChoice::Index(i) if i < self.stats.len() => Ok(i),
            StatsChoice::Index(i) => Err(ScoreError::Unavailable(format!(
                "fit statistics #{i} are not loaded"
            ))),
            StatsChoice::Auto => self.stats_for(perturbation).ok_or_else(|| {
                ScoreError::Unavailable(
                    "no fit statistics are loaded for this model (odin-sidecar fit, then serve --fit-stats FILE)"
                        .into(),
                )
            }),
        }
    }

    /// The detector of a feature method over statistics `index`, built once.
    fn detector(&self, method: Method, index: usize) -> Result<Arc<dyn Detector>, ScoreError> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(d) = cache.get(&(method, index)) {
            return Ok(Arc::clone(d));
        }
        let loaded = &self.stats[index];
        let stats = &loaded.stats;
        if let Some(dim) = self.dim {
            if stats.dim() != dim {
                return Err(ScoreError::Unavailable(format!(
                    "the fit statistics {} have D = {}, the model's features D = {dim}",
                    loaded.name,
                    stats.dim()
                )));
            }
        }
        let unavailable = |e: DetectorError| ScoreError::Unavailable(format!("{method}: {e}"));
        let detector: Arc<dyn Detector> = match method {
            Method::Knn { k } => Arc::new(
                Knn::with_bank(loaded.knn_bank().map_err(unavailable)?, k as usize)
                    .map_err(unavailable)?,
            ),
            Method::Vim { dim } => {
                Arc::new(Vim::new(stats, (dim > 0).then_some(dim as usize)).map_err(unavailable)?)
            }
            Method::Mds => Arc::new(Mds::new(stats).map_err(unavailable)?),
            Method::Rmds => Arc::new(Rmds::new(stats).map_err(unavailable)?),
            Method::React { percentile } => {
                Arc::new(React::new(stats, f64::from(percentile) / 100.0).map_err(unavailable)?)
            }
            Method::Fdbd => {
                Arc::new(Fdbd::new(stats, FdbdNormalizer::TrainMean).map_err(unavailable)?)
            }
            other => {
                return Err(ScoreError::Unavailable(format!(
                    "{other} is not a feature detector"
                )))
            }
        };
        cache.insert((method, index), Arc::clone(&detector));
        Ok(detector)
    }

    /// Checks that `scoring` can be served (and builds its detectors, so
    /// the first frame does not pay for it).
    pub fn check(&self, scoring: &Scoring) -> Result<(), ScoreError> {
        let perturbation = scoring.perturbation();
        match scoring.method {
            Method::Combined => {
                let c = self.combination.as_ref().ok_or_else(|| {
                    ScoreError::Unavailable(
                        "no combination is configured (it comes from a calibration file of calibrate --auto)"
                            .into(),
                    )
                })?;
                if c.perturbation.map(|p| p.key()) != perturbation.map(|p| p.key()) {
                    return Err(ScoreError::Unavailable(format!(
                        "the combination was calibrated at {}; a frame cannot change T or ε for it",
                        c.perturbation.map_or("ε = 0".to_string(), |p| format!(
                            "T = {}, ε = {}",
                            p.temperature, p.epsilon
                        ))
                    )));
                }
                for part in &c.parts {
                    self.check_part(part.method, part.stats, part.perturbed, perturbation)?;
                }
                Ok(())
            }
            method => self.check_part(
                method,
                StatsChoice::Auto,
                perturbation.is_some(),
                perturbation,
            ),
        }
    }

    fn check_part(
        &self,
        method: Method,
        stats: StatsChoice,
        perturbed: bool,
        perturbation: Option<Perturbation>,
    ) -> Result<(), ScoreError> {
        if method == Method::Combined {
            return Err(ScoreError::Unavailable(
                "a combination cannot contain another".into(),
            ));
        }
        if !method.needs_features() {
            return Ok(());
        }
        if self.dim.is_none() {
            return Err(ScoreError::Unavailable(format!(
                "{method} needs the model's penultimate features, which could not be tapped"
            )));
        }
        let index = self.choose(stats, perturbed.then_some(perturbation).flatten())?;
        self.detector(method, index).map(|_| ())
    }

    /// Scores a batch under `scoring` into `out` (`view.n` values).
    pub fn score_batch(
        &self,
        scoring: &Scoring,
        view: &BatchView<'_>,
        out: &mut [f32],
    ) -> Result<(), ScoreError> {
        let perturbation = scoring.perturbation();
        if scoring.method != Method::Combined {
            return self.score_part(
                scoring.method,
                scoring.temperature,
                perturbation.is_some(),
                StatsChoice::Auto,
                perturbation,
                view,
                out,
            );
        }
        let c = self
            .combination
            .as_ref()
            .ok_or_else(|| ScoreError::Unavailable("no combination is configured".into()))?;
        let mut acc = vec![0.0f64; view.n];
        let mut tmp = vec![0.0f32; view.n];
        for part in &c.parts {
            self.score_part(
                part.method,
                part.temperature,
                part.perturbed,
                part.stats,
                c.perturbation,
                view,
                &mut tmp,
            )?;
            for (a, s) in acc.iter_mut().zip(&tmp) {
                *a += part.weight * part.norm.z(f64::from(*s));
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = *a as f32;
        }
        Ok(())
    }

    /// Scores a batch with one method on the frames as sent or on their
    /// perturbed versions.
    #[allow(clippy::too_many_arguments)]
    pub fn score_part(
        &self,
        method: Method,
        temperature: f32,
        perturbed: bool,
        stats: StatsChoice,
        perturbation: Option<Perturbation>,
        view: &BatchView<'_>,
        out: &mut [f32],
    ) -> Result<(), ScoreError> {
        let n = view.n;
        if out.len() != n {
            return Err(DetectorError::Shape {
                what: "out",
                expected: n,
                found: out.len(),
            }
            .into());
        }
        if n == 0 {
            return Ok(());
        }
        let logits = view.logits(perturbed)?;
        let k = logits.len() / n;
        let rows = || logits.chunks_exact(k.max(1));
        match method {
            Method::Msp | Method::Odin => {
                for (o, z) in out.iter_mut().zip(rows()) {
                    *o = max_softmax(z, temperature);
                }
            }
            Method::Energy => {
                let t = f64::from(temperature);
                for (o, z) in out.iter_mut().zip(rows()) {
                    *o = (t * super::log_sum_exp(z, t)) as f32;
                }
            }
            Method::MaxLogit => {
                for (o, z) in out.iter_mut().zip(rows()) {
                    *o = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                }
            }
            Method::Gen { .. } => {
                let gen = Gen::for_method(method).ok_or_else(|| {
                    ScoreError::Unavailable(format!("{method} is not a GEN method"))
                })?;
                gen.score_batch(
                    FeatureBatch {
                        logits,
                        features: &[],
                        n,
                    },
                    out,
                )?;
            }
            Method::Combined => {
                return Err(ScoreError::Unavailable(
                    "a combination cannot contain another".into(),
                ))
            }
            feature_method => {
                let features = view.features(perturbed)?;
                let index = self.choose(stats, perturbed.then_some(perturbation).flatten())?;
                let detector = self.detector(feature_method, index)?;
                detector.score_batch(
                    FeatureBatch {
                        logits,
                        features,
                        n,
                    },
                    out,
                )?;
            }
        }
        Ok(())
    }
}
