//! Gemm and MatMul (`src/grad/rules/gemm.rs`): transposes, α and β, a
//! bias that depends on the input, both operands varying, batched and
//! broadcast MatMul.

use crate::harness::*;

#[test]
fn gemm_transb_alpha_beta_bias() {
    check_case(
        Case::new("gemm_tb", &[2, 6], |_| {
            vec![n(
                "Gemm",
                &["x", "w", "c"],
                &["f"],
                vec![ai("transB", 1), af("alpha", 0.7), af("beta", 0.5)],
            )]
        })
        .w("w", &[4, 6], 1.0)
        .w("c", &[4], 1.0),
    );
}

#[test]
fn gemm_transa_both_operands_vary() {
    // f = 1.3·(xᵀ)ᵀ·Bᵀ with B = xᵀ·x·W: A and B both depend on x (B
    // through the whole batch, which the differences see too).
    check_case(
        Case::new("gemm_ta", &[2, 3], |_| {
            vec![
                n("Transpose", &["x"], &["xt"], vec![ais("perm", &[1, 0])]),
                n("MatMul", &["xt", "x"], &["gram"], vec![]),
                n("MatMul", &["gram", "w"], &["b"], vec![]),
                n(
                    "Gemm",
                    &["xt", "b"],
                    &["f"],
                    vec![ai("transA", 1), ai("transB", 1), af("alpha", 1.3)],
                ),
            ]
        })
        .w("w", &[3, 3], 0.3)
        .mixes(),
    );
}

#[test]
fn gemm_bias_that_depends_on_x() {
    // C = x itself (broadcast-free) and a row-broadcast C = mean over features.
    check_case(
        Case::new("gemm_c", &[2, 4], |_| {
            vec![
                n(
                    "ReduceMean",
                    &["x"],
                    &["m"],
                    vec![ais("axes", &[1]), ai("keepdims", 1)],
                ),
                n(
                    "Gemm",
                    &["x", "w", "x"],
                    &["g1"],
                    vec![ai("transB", 1), af("beta", 0.6)],
                ),
                n(
                    "Gemm",
                    &["g1", "w", "m"],
                    &["f"],
                    vec![af("alpha", 0.9), af("beta", -1.5)],
                ),
            ]
        })
        .w("w", &[4, 4], 0.7),
    );
}

#[test]
fn matmul_batched_and_broadcast() {
    check_case(
        Case::new("matmul", &[2, 3, 4, 5], |_| {
            vec![
                n("MatMul", &["x", "w"], &["a"], vec![]),
                n(
                    "Transpose",
                    &["x"],
                    &["xt"],
                    vec![ais("perm", &[0, 1, 3, 2])],
                ),
                n("MatMul", &["xt", "a"], &["b"], vec![]),
                n("MatMul", &["w3", "b"], &["f"], vec![]),
            ]
        })
        .w("w", &[5, 6], 0.5)
        .w("w3", &[3, 2, 5], 0.5),
    );
}
