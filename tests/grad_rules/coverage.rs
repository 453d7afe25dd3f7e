//! What the pass refuses and how it says so: every uncovered node in one
//! error (even when ONNX Runtime cannot run the model), and rule errors
//! that name the node, its op and the opset.

use odin_sidecar::grad::{derive, GradError, GradOptions};
use odin_sidecar::onnx::{tensor_proto::DataType, ModelProto, OperatorSetIdProto};
use prost::Message;

use crate::harness::*;

#[test]
fn uncovered_ops_are_all_listed_in_one_error() {
    let case = Case::new("uncovered", &[2, 3, 4], |_| {
        vec![
            n("Sin", &["x"], &["s"], vec![]),
            n("Relu", &["s"], &["r"], vec![]),
            n("Floor", &["r"], &["fl"], vec![]),
            n("Cos", &["w"], &["const_only"], vec![]),
            n("Add", &["fl", "const_only"], &["f"], vec![]),
        ]
    })
    .w("w", &[3, 4], 1.0);
    let err = derive_case(
        &case,
        DataType::Float as i32,
        &GradOptions {
            std: vec![1.0],
            raw_gradient: false,
            ..Default::default()
        },
    )
    .expect_err("Sin and Floor have no rule");
    let msg = err.to_string();
    match &err {
        GradError::Unsupported(nodes) => {
            let ops: Vec<&str> = nodes.iter().map(|u| u.op.as_str()).collect();
            assert_eq!(ops, ["Sin", "Floor"], "{msg}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    for part in ["Sin_s", "Floor_fl", "opset 17", "2 node(s)"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // Cos acts on a constant only: it is not on the path and not reported.
    assert!(!msg.contains("Cos"), "{msg}");
}

#[test]
fn rule_errors_name_node_op_and_opset() {
    let case = Case::new("reflect", &[2, 3, 4], |_| {
        vec![n(
            "Pad",
            &["x", "pads"],
            &["f"],
            vec![as_("mode", "reflect")],
        )]
    })
    .ints("pads", &[0, 0, 1, 0, 0, 1]);
    let msg = derive_case(
        &case,
        DataType::Float as i32,
        &GradOptions {
            std: vec![1.0],
            raw_gradient: false,
            ..Default::default()
        },
    )
    .expect_err("reflect padding is not covered")
    .to_string();
    for part in ["Pad_f", "(Pad, opset 17)", "mode", "reflect"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
}

#[test]
fn uncovered_ops_are_listed_even_when_onnx_runtime_cannot_run_them() {
    // A custom-domain op stops the probe run; the error still lists every
    // uncovered node, not ONNX Runtime's complaint about the first one.
    let case = Case::new("custom", &[2, 3, 4], |_| {
        let mut custom = n("Frobnicate", &["x"], &["c"], vec![]);
        custom.domain = Some("com.example".into());
        vec![
            custom,
            n("Sin", &["c"], &["s"], vec![]),
            n("Shape", &["s"], &["sh"], vec![]),
            n("Relu", &["s"], &["f"], vec![]),
        ]
    });
    let x = input(&case);
    let dt = DataType::Float as i32;
    // `build` runs the body to size the head; this body cannot run, so
    // write the model with a fixed head by hand.
    let mut nodes = (case.nodes)(dt);
    nodes.push(n("Flatten", &["f"], &["flat"], vec![ai("axis", 1)]));
    nodes.push(n("MatMul", &["flat", "head_w"], &["z"], vec![]));
    let head = float_init("head_w", dt, &[12, CLASSES], &vec![0.1; 60]);
    let mut m = ModelProto::decode(model(&case, dt, nodes, vec![head], "z").as_slice()).unwrap();
    m.opset_import.push(OperatorSetIdProto {
        domain: Some("com.example".into()),
        version: Some(3),
    });
    let _ = x;
    let err = derive(
        &m.encode_to_vec(),
        &GradOptions {
            std: vec![1.0],
            raw_gradient: false,
            ..Default::default()
        },
    )
    .unwrap_err();
    let msg = err.to_string();
    let GradError::Unsupported(nodes) = err else {
        panic!("expected Unsupported, got {msg}")
    };
    let ops: Vec<&str> = nodes.iter().map(|u| u.op.as_str()).collect();
    assert_eq!(ops, ["com.example.Frobnicate", "Sin"], "{msg}");
    assert!(msg.contains("opset 3"), "{msg}");
}
