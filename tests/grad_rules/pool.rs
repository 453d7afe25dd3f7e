//! MaxPool, AveragePool and the global pools (`src/grad/rules/pool.rs`):
//! overlapping and disjoint windows, ceil mode, dilations, padding in or
//! out of the average, and the opset-13 MaxPool limit. Max-pool inputs
//! are distinct so no window has a tie a finite-difference step could
//! flip.

use odin_sidecar::grad::GradOptions;
use odin_sidecar::onnx::tensor_proto::DataType;

use crate::harness::*;

#[test]
fn max_pool_overlapping_windows() {
    let mut c = Case::new("maxpool", &[2, 3, 7, 8], |_| {
        vec![n(
            "MaxPool",
            &["x"],
            &["f"],
            vec![
                ais("kernel_shape", &[3, 3]),
                ais("strides", &[2, 2]),
                ais("pads", &[1, 1, 1, 1]),
            ],
        )]
    })
    .distinct();
    c.f32_only = false;
    check_case(c);
}

#[test]
fn max_pool_ceil_mode_dilated() {
    check_case(
        Case::new("maxpool_ceil", &[2, 2, 9, 7], |_| {
            vec![n(
                "MaxPool",
                &["x"],
                &["f"],
                vec![
                    ais("kernel_shape", &[2, 3]),
                    ais("strides", &[2, 2]),
                    ai("ceil_mode", 1),
                    ais("dilations", &[2, 1]),
                ],
            )]
        })
        .distinct(),
    );
}

#[test]
fn max_pool_opset13_disjoint_windows_use_max_unpool() {
    check_case(
        Case::new("maxpool13", &[2, 3, 6, 7], |_| {
            vec![n(
                "MaxPool",
                &["x"],
                &["f"],
                vec![ais("kernel_shape", &[2, 2]), ais("strides", &[2, 3])],
            )]
        })
        .distinct()
        .opset(13),
    );
}

#[test]
fn max_pool_opset13_overlapping_windows_are_refused() {
    let case = Case::new("maxpool13o", &[2, 3, 6, 7], |_| {
        vec![n(
            "MaxPool",
            &["x"],
            &["f"],
            vec![ais("kernel_shape", &[3, 3]), ais("strides", &[2, 2])],
        )]
    })
    .opset(13);
    let e = derive_case(
        &case,
        DataType::Float as i32,
        &GradOptions {
            std: vec![1.0],
            raw_gradient: false,
            ..Default::default()
        },
    )
    .expect_err("needs opset 16")
    .to_string();
    assert!(
        e.contains("opset 16") && e.contains("MaxPool, opset 13"),
        "{e}"
    );
}

fn avg(name: &'static str, include_pad: i64, ceil: i64) -> Case {
    // H = 8 makes ceil_mode add a last, truncated window; no window starts
    // inside the padding (where ONNX shape inference and kernels differ).
    Case::new(name, &[2, 3, 8, 7], move |_| {
        vec![n(
            "AveragePool",
            &["x"],
            &["f"],
            vec![
                ais("kernel_shape", &[3, 2]),
                ais("strides", &[2, 2]),
                ais("pads", &[1, 0, 1, 1]),
                ai("count_include_pad", include_pad),
                ai("ceil_mode", ceil),
            ],
        )]
    })
}

#[test]
fn average_pool_excluding_pad() {
    check_case(avg("avg_excl", 0, 0));
}

#[test]
fn average_pool_including_pad() {
    check_case(avg("avg_incl", 1, 0));
}

#[test]
fn average_pool_ceil_mode() {
    check_case(avg("avg_ceil", 0, 1));
}

#[test]
fn average_pool_global_sized() {
    check_case(Case::new("avg_global", &[2, 3, 8, 8], |_| {
        vec![n(
            "AveragePool",
            &["x"],
            &["f"],
            vec![ais("kernel_shape", &[8, 8]), ais("strides", &[8, 8])],
        )]
    }));
}

#[test]
fn global_average_pool() {
    check_case(Case::new("gap", &[2, 3, 5, 7], |_| {
        vec![n("GlobalAveragePool", &["x"], &["f"], vec![])]
    }));
}

#[test]
fn global_max_pool() {
    check_case(
        Case::new("gmp", &[2, 3, 5, 7], |_| {
            vec![n("GlobalMaxPool", &["x"], &["f"], vec![])]
        })
        .distinct(),
    );
}
