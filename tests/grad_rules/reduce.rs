//! ReduceMean and ReduceSum (`src/grad/rules/reduce.rs`), axes as an
//! attribute and as an input, over the batch axis too.

use crate::harness::*;

#[test]
fn reduce_mean_and_sum() {
    check_case(
        Case::new("reduce", &[2, 3, 4, 5], |_| {
            vec![
                n(
                    "ReduceMean",
                    &["x"],
                    &["m"],
                    vec![ais("axes", &[1, -1]), ai("keepdims", 0)],
                ),
                n("ReduceSum", &["x", "ax"], &["s"], vec![ai("keepdims", 1)]),
                n("Flatten", &["s"], &["sf"], vec![]),
                n("Flatten", &["m"], &["mf"], vec![]),
                n("Concat", &["mf", "sf"], &["f"], vec![ai("axis", 1)]),
            ]
        })
        .ints("ax", &[2]),
    );
}

#[test]
fn reduce_mean_over_the_batch_axis() {
    // The count depends on the batch size: computed at run time from Size.
    check_case(
        Case::new("reduce_batch", &[2, 3, 4], |_| {
            vec![
                n(
                    "ReduceMean",
                    &["x"],
                    &["m"],
                    vec![ais("axes", &[0, 2]), ai("keepdims", 1)],
                ),
                n("Sub", &["x", "m"], &["d"], vec![]),
                n("Mul", &["d", "d"], &["f"], vec![]),
            ]
        })
        .mixes(),
    );
}
