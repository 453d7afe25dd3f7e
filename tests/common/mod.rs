//! Test support shared by every integration test, the gradient-rule tests
//! (`tests/grad_rules`) and the benchmark (`benches/grad.rs`), one module
//! per concern:
//!
//! - `data`: where the real data lives, and `require!`, which skips a test
//!   (one line, recorded for `make test`'s summary) when it is absent;
//! - `server`: a real sidecar on an ephemeral loopback port, its clients,
//!   and the built-in and ResNet-20 configurations;
//! - `frames`: seeded synthetic images, their encodings and raw sets on disk;
//! - `onnx`: ONNX Runtime sessions and a seeded PRNG for the gradient tests;
//! - `reference`: expected answers computed independently of the pipeline
//!   (normalization, max-softmax, energy, the reference engine).
#![allow(dead_code, unused_imports, unused_macros)]

#[macro_use]
pub mod data;
pub mod frames;
pub mod onnx;
pub mod reference;
pub mod server;

pub use data::*;
pub use frames::*;
pub use onnx::*;
pub use reference::*;
pub use server::*;
