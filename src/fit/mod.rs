//! Fitting the feature-space detectors' training statistics.
//!
//! * [`Fitter`]: a streaming fitter over training batches of (features,
//!   logits, label) that produces [`Stats`];
//! * [`stats`]: the statistics and their versioned safetensors file, which
//!   `serve`, `calibrate` and `eval` load;
//! * [`linalg`]: the small `f64` linear algebra they need (Householder + QL
//!   eigensolver, pseudo-inverses, GEMM through `ndarray`);
//! * [`rng`]: the seeded generator of the reservoir-sampled KNN bank.

mod fitter;
pub mod linalg;
pub mod rng;
pub mod stats;
pub mod train;

pub use fitter::{
    default_vim_dim, percentile_linear, FitConfig, FitError, FitReport, Fitter,
    DEFAULT_REACT_PERCENTILES,
};
pub use stats::{FitPerturbation, ModelInfo as StatsModel, Stats, StatsError};
