//! Add, Sub, Mul, Div (`src/grad/rules/elementwise.rs`) with broadcast
//! operands that both depend on the input.

use crate::harness::*;

#[test]
fn add_sub_mul_div_with_broadcast_activations() {
    // b = mean over H, W (broadcast back), both operands depend on x.
    check_case(
        Case::new("arith", &[2, 3, 4, 5], |_| {
            vec![
                n(
                    "ReduceMean",
                    &["x"],
                    &["b"],
                    vec![ais("axes", &[2, 3]), ai("keepdims", 1)],
                ),
                n("Sub", &["x", "b"], &["d"], vec![]),
                n("Mul", &["d", "b"], &["p"], vec![]),
                n("Mul", &["b", "b"], &["b2"], vec![]),
                n("Add", &["b2", "one"], &["den"], vec![]),
                n("Div", &["p", "den"], &["q"], vec![]),
                n("Add", &["q", "c"], &["r"], vec![]),
                n("Div", &["r", "c2"], &["f"], vec![]),
            ]
        })
        .fixed("one", &[], &[1.0])
        .w("c", &[3, 1, 1], 1.0)
        .fixed("c2", &[5], &[1.5, 2.0, -1.7, 3.0, 2.5]),
    );
}
