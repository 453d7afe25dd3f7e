//! Conv and ConvTranspose (`src/grad/rules/conv.rs`): strides with
//! padding, groups, dilations, asymmetric pads, every `auto_pad`, 1-D,
//! and both adjoint forms of a stride-1 Conv (flipped-kernel Conv, and
//! ConvTranspose where pads are wider than the kernel allows).

use crate::harness::*;

#[test]
fn conv_stride2_pad_bias() {
    check_case(
        Case::new("conv_s2", &[2, 3, 7, 6], |_| {
            vec![n(
                "Conv",
                &["x", "w", "b"],
                &["f"],
                vec![ais("strides", &[2, 2]), ais("pads", &[1, 1, 1, 1])],
            )]
        })
        .w("w", &[4, 3, 3, 3], 0.5)
        .w("b", &[4], 0.5),
    );
}

#[test]
fn conv_groups_dilations_asymmetric_pads() {
    check_case(
        Case::new("conv_groups", &[2, 4, 9, 8], |_| {
            vec![n(
                "Conv",
                &["x", "w"],
                &["f"],
                vec![
                    ai("group", 2),
                    ais("dilations", &[2, 1]),
                    ais("pads", &[1, 0, 2, 1]),
                    ais("strides", &[1, 2]),
                ],
            )]
        })
        .w("w", &[6, 2, 3, 2], 0.5),
    );
}

#[test]
fn conv_stride1_grouped_dilated() {
    // Stride 1: the adjoint is a flipped-kernel Conv with regrouped weights.
    check_case(
        Case::new("conv_s1_groups", &[2, 4, 7, 6], |_| {
            vec![n(
                "Conv",
                &["x", "w", "b"],
                &["f"],
                vec![
                    ai("group", 2),
                    ais("dilations", &[1, 2]),
                    ais("pads", &[1, 2, 0, 1]),
                ],
            )]
        })
        .w("w", &[6, 2, 3, 3], 0.5)
        .w("b", &[6], 0.5),
    );
}

#[test]
fn conv_stride1_depthwise_same_lower() {
    check_case(
        Case::new("conv_s1_dw", &[2, 3, 6, 5], |_| {
            vec![n(
                "Conv",
                &["x", "w"],
                &["f"],
                vec![ai("group", 3), as_("auto_pad", "SAME_LOWER")],
            )]
        })
        .w("w", &[3, 1, 2, 3], 0.5),
    );
}

#[test]
fn conv_stride1_pad_wider_than_kernel() {
    // pads > d·(k−1): the flipped Conv would need negative pads, so the
    // ConvTranspose form is used.
    check_case(
        Case::new("conv_s1_bigpad", &[2, 3, 5, 5], |_| {
            vec![n(
                "Conv",
                &["x", "w"],
                &["f"],
                vec![ais("pads", &[3, 1, 2, 3])],
            )]
        })
        .w("w", &[2, 3, 3, 3], 0.5),
    );
}

#[test]
fn conv_depthwise_same_upper() {
    check_case(
        Case::new("conv_dw", &[2, 3, 7, 8], |_| {
            vec![n(
                "Conv",
                &["x", "w"],
                &["f"],
                vec![
                    ai("group", 3),
                    as_("auto_pad", "SAME_UPPER"),
                    ais("strides", &[2, 3]),
                ],
            )]
        })
        .w("w", &[3, 1, 3, 3], 0.5),
    );
}

#[test]
fn conv1d_same_lower_and_valid() {
    check_case(
        Case::new("conv1d", &[2, 3, 11], |_| {
            vec![
                n(
                    "Conv",
                    &["x", "w1"],
                    &["h"],
                    vec![as_("auto_pad", "SAME_LOWER"), ais("strides", &[2])],
                ),
                n(
                    "Conv",
                    &["h", "w2"],
                    &["f"],
                    vec![as_("auto_pad", "VALID"), ais("strides", &[2])],
                ),
            ]
        })
        .w("w1", &[4, 3, 4], 0.5)
        .w("w2", &[2, 4, 2], 0.5),
    );
}

#[test]
fn conv_transpose_stride2() {
    check_case(
        Case::new("convT", &[2, 4, 5, 4], |_| {
            vec![n(
                "ConvTranspose",
                &["x", "w"],
                &["f"],
                vec![
                    ais("strides", &[2, 2]),
                    ais("pads", &[1, 0, 1, 1]),
                    ais("output_padding", &[1, 0]),
                ],
            )]
        })
        .w("w", &[4, 3, 3, 3], 0.5),
    );
}
