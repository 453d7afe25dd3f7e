//! Shape and data-movement ops (`src/grad/rules/shape.rs`): Reshape,
//! Transpose, (Un)Squeeze, Flatten, Concat, Split, Slice with negative
//! and strided steps, constant Pad, Identity, Dropout, Cast.

use odin_sidecar::onnx::tensor_proto::DataType;

use crate::harness::*;

#[test]
fn reshape_transpose_squeeze_unsqueeze_flatten() {
    check_case(
        Case::new("shapes", &[2, 3, 4, 5], |_| {
            vec![
                n(
                    "Transpose",
                    &["x"],
                    &["t"],
                    vec![ais("perm", &[0, 2, 3, 1])],
                ),
                n("Reshape", &["t", "shape"], &["r"], vec![]),
                n("Unsqueeze", &["r", "ax13"], &["u"], vec![]),
                n("Squeeze", &["u", "ax3"], &["s"], vec![]),
                n("Flatten", &["s"], &["fl"], vec![ai("axis", 2)]),
                n("Mul", &["fl", "k"], &["f"], vec![]),
            ]
        })
        .ints("shape", &[0, 12, 5])
        .ints("ax13", &[1, 3])
        .ints("ax3", &[3])
        .w("k", &[60], 1.0),
    );
}

#[test]
fn concat_and_split_with_an_unused_output() {
    check_case(
        Case::new("concat_split", &[2, 3, 4, 5], |_| {
            vec![
                n("Mul", &["x", "x"], &["x2"], vec![]),
                n("Sigmoid", &["x"], &["sx"], vec![]),
                n("Concat", &["x", "sx", "x2"], &["cat"], vec![ai("axis", 1)]),
                n(
                    "Split",
                    &["cat", "sp"],
                    &["a", "b", "unused"],
                    vec![ai("axis", 1)],
                ),
                n("Mul", &["a", "b"], &["f"], vec![]),
            ]
        })
        .ints("sp", &[4, 4, 1]),
    );
}

#[test]
fn slice_resnet_style_step2() {
    check_case(
        Case::new("slice_step2", &[2, 3, 8, 7], |_| {
            vec![n("Slice", &["x", "st", "en", "ax", "sp"], &["f"], vec![])]
        })
        .ints("st", &[0, 0])
        .ints("en", &[i64::MAX, i64::MAX])
        .ints("ax", &[2, 3])
        .ints("sp", &[2, 2]),
    );
}

#[test]
fn slice_negative_steps_and_offsets() {
    check_case(
        Case::new("slice_neg", &[2, 5, 9, 8], |_| {
            vec![n("Slice", &["x", "st", "en", "ax", "sp"], &["f"], vec![])]
        })
        .ints("st", &[1, 7, -1])
        .ints("en", &[4, 0, -100])
        .ints("ax", &[1, 2, -1])
        .ints("sp", &[1, -3, -2]),
    );
}

#[test]
fn slice_strided_channel_axis() {
    check_case(
        Case::new("slice_chan", &[2, 7, 4, 3], |_| {
            vec![n("Slice", &["x", "st", "en", "ax", "sp"], &["f"], vec![])]
        })
        .ints("st", &[1, 1])
        .ints("en", &[7, 3])
        .ints("ax", &[1, 3])
        .ints("sp", &[3, 1]),
    );
}

#[test]
fn pad_constant_positive_and_negative() {
    check_case(
        Case::new("pad", &[2, 3, 5, 6], |_| {
            vec![n(
                "Pad",
                &["x", "pads", "cv"],
                &["f"],
                vec![as_("mode", "constant")],
            )]
        })
        .ints("pads", &[0, 2, 1, -1, 0, 1, -2, 2])
        .fixed("cv", &[], &[0.3]),
    );
}

#[test]
fn identity_dropout_cast() {
    // float32 → float64 → float32 is lossless; the reverse would round.
    let mut c = Case::new("ident", &[2, 3, 4], |dt| {
        let other = if dt == DataType::Double as i32 {
            DataType::Float
        } else {
            DataType::Double
        };
        vec![
            n("Identity", &["x"], &["i"], vec![]),
            n("Dropout", &["i"], &["d"], vec![]),
            n("Cast", &["d"], &["c"], vec![ai("to", other as i64)]),
            n("Cast", &["c"], &["f"], vec![ai("to", i64::from(dt))]),
        ]
    });
    c.f32_only = true;
    check_case(c);
}
