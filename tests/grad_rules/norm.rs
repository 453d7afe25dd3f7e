//! BatchNormalization in inference form (`src/grad/rules/norm.rs`).

use crate::harness::*;

#[test]
fn batch_norm_inference() {
    check_case(
        Case::new("bn", &[2, 3, 5, 4], |_| {
            vec![n(
                "BatchNormalization",
                &["x", "s", "b", "m", "v"],
                &["f"],
                vec![af("epsilon", 1e-3)],
            )]
        })
        .w("s", &[3], 1.0)
        .w("b", &[3], 1.0)
        .w("m", &[3], 0.5)
        .fixed("v", &[3], &[0.5, 1.5, 2.0]),
    );
}
