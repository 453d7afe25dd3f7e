//! odin-sidecar: a gRPC sidecar that tells an ML pipeline, frame by frame,
//! whether an image is in-distribution for its classifier.
//!
//! The modules below are listed in data-path order: a frame arrives over a
//! wire protocol at the server, becomes the core's own request type, is
//! decoded, batched across streams, run through the engine, scored, and
//! answered. `docs/architecture.md` draws the same path with the file that
//! owns each stage.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// Process start: command line, configuration, start-up and shutdown.
pub mod cli;

pub mod config;

pub mod app;

// The network edge: listeners, the layered gRPC stack, HTTP probes, and the
// protocols, each converting to and from the core's types.
pub mod server;

pub mod wire;

// The core: its vocabulary, the frame path and the errors a frame can meet.
pub mod domain;

pub mod pipeline;

pub mod error;

// Inference: the model, the engine that runs it, the gradient pass that
// derives ODIN's graph from it, and ONNX Runtime at the bottom.
pub mod model;

pub mod engine;

pub mod grad;

pub mod onnx;

pub mod runtime;

// Scoring, calibration and evaluation.
pub mod score;

pub mod calib;

pub mod fit;

pub mod dataset;

// Observability and load generation.
pub mod telemetry;

pub mod loadgen;
