//! Calibration and evaluation: choosing (T, ε, δ) from validation data, and
//! measuring how well the detector separates in- from out-of-distribution.

pub mod metrics;
