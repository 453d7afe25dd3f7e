//! One finite-difference test per adjoint rule: a small model built here
//! (seeded random weights, odd sizes, strides with padding, groups,
//! broadcasting) is derived, and its `gradient` output is compared with
//! central differences of the same loss, L = Σ_images CE(softmax(z/T),
//! argmax z), computed through ONNX Runtime on the plain model.
//!
//! Models run in float64 where ONNX Runtime's CPU kernels exist for every
//! op in the plain and derived graph (step 1e-6, tolerance 1e-6 of the
//! largest derivative: truncation ~h² and rounding ~1e-16/h are both far
//! below it). Otherwise float32 (Conv, ConvTranspose, pools, ...): step
//! 1e-2 and tolerance 5e-3 of the largest derivative, because the logits
//! carry ~1e-7 relative rounding, which central differences divide by 2h
//! (~1e-5 of a gradient of order 0.1), and the O(h²) truncation of a
//! smooth loss at h = 1e-2 stays under ~1e-3 relative. Inputs are drawn at
//! least 0.05 (> h) away from every kink of the op under test.
//!
//! Layout: `harness` holds the machinery (model builder, inputs, loss,
//! `check_case`); one module per op family mirrors `src/grad/rules/`;
//! `coverage` checks what the pass refuses and how it says so, `outputs`
//! what the derived graph returns besides the gradient.

#[macro_use]
#[path = "../common/mod.rs"]
mod common;

mod harness;

mod activation;
mod conv;
mod elementwise;
mod gemm;
mod norm;
mod pool;
mod reduce;
mod shape;

mod coverage;
mod outputs;
