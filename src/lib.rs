//! odin-sidecar: a gRPC sidecar that tells an ML pipeline, frame by frame,
//! whether an image is in-distribution for its classifier.
//!
//! Modules are listed in data-path order: a frame arrives over the wire
//! protocol, is decoded into the model's input tensor, batched across
//! streams, run through the engine, scored, and answered.
#![forbid(unsafe_code)]

pub mod app;
pub mod calib;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod engine;
pub mod error;
pub mod grad;
pub mod loadgen;
pub mod model;
pub mod onnx;
pub mod pipeline;
pub mod runtime;
pub mod score;
pub mod server;
pub mod telemetry;
pub mod wire;
