//! Calibration and evaluation: choosing (T, ε, δ) from validation data, and
//! measuring how well the detector separates in- from out-of-distribution.

pub mod calibrate;
pub mod metrics;
pub mod plot;
pub mod scores;
pub mod search;
pub mod sets;
