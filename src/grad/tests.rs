//! Unit tests of the pass's graph analysis (no ONNX Runtime needed).

use super::*;
use crate::onnx::GraphProto;

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(outputs[0].into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The ResNet flatten: Reshape(a, Concat(Unsqueeze(Gather(Shape(a))), -1)).
fn flatten_graph() -> GraphProto {
    GraphProto {
        node: vec![
            node("Relu", &["x"], &["a"]),
            node("Shape", &["a"], &["s"]),
            node("Gather", &["s", "zero"], &["n"]),
            node("Unsqueeze", &["n", "axes"], &["n1"]),
            node("Concat", &["n1", "minus1"], &["target"]),
            node("Reshape", &["a", "target"], &["flat"]),
            node("Gemm", &["flat", "w", "b"], &["z"]),
            node("Sin", &["w"], &["unused"]),
        ],
        ..Default::default()
    }
}

#[test]
fn shape_stops_the_gradient() {
    let g = flatten_graph();
    let order: Vec<usize> = (0..g.node.len()).collect();
    let table = RuleTable::standard();
    let (active, on_path) =
        differentiable_path(&g, &order, &table, "x", "z", &|n, _| !non_differentiable(n));
    for t in ["x", "a", "flat", "z"] {
        assert!(active.contains(t), "{t} carries gradient");
    }
    for t in ["s", "n", "n1", "target", "unused"] {
        assert!(!active.contains(t), "{t} must not carry gradient");
    }
    let ops: Vec<&str> = g
        .node
        .iter()
        .zip(&on_path)
        .filter(|(_, on)| **on)
        .map(|(n, _)| n.op_type())
        .collect();
    assert_eq!(ops, ["Relu", "Reshape", "Gemm"]);
}

#[test]
fn uncovered_nodes_name_domain_and_opset() {
    let mut g = flatten_graph();
    g.node[0].op_type = Some("Softsign".into());
    g.node[6].domain = Some("com.vendor".into());
    let proto = ModelProto {
        opset_import: vec![
            crate::onnx::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(17),
            },
            crate::onnx::OperatorSetIdProto {
                domain: Some("com.vendor".into()),
                version: Some(2),
            },
        ],
        graph: Some(g.clone()),
        ..Default::default()
    };
    let table = RuleTable::standard();
    let order: Vec<usize> = (0..g.node.len()).collect();
    let (_, on_path) =
        differentiable_path(&g, &order, &table, "x", "z", &|n, _| !non_differentiable(n));
    let u = uncovered_nodes(&proto, 17, &table, &on_path);
    let text = GradError::Unsupported(u).to_string();
    assert_eq!(
        text,
        "no gradient rule for 2 node(s) on the path from the input to the logits: \
         a (Softsign, opset 17); z (com.vendor.Gemm, opset 2)"
    );
}

#[test]
fn summary_lists_counts_and_notes() {
    let s = Summary {
        ops_found: BTreeMap::from([("Conv".to_string(), 2), ("Relu".to_string(), 1)]),
        rules_applied: BTreeMap::from([("Conv".to_string(), 2)]),
        nodes_added: 7,
        notes: vec!["the model ends in Softmax".into()],
    };
    let text = s.to_string();
    assert!(text.contains("ops found:     Conv×2, Relu×1"), "{text}");
    assert!(text.contains("nodes added:   7"), "{text}");
    assert!(text.contains("note: the model ends in Softmax"), "{text}");
}

#[test]
fn garbage_is_a_decode_error_and_old_opsets_are_refused() {
    assert!(matches!(
        derive(&[0xff, 0xff, 0xff], &GradOptions::default()),
        Err(GradError::Decode(_))
    ));
    let old = ModelProto {
        opset_import: vec![crate::onnx::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(11),
        }],
        graph: Some(flatten_graph()),
        ..Default::default()
    };
    let e = derive(&old.encode_to_vec(), &GradOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("opset 11") && e.contains("13"), "{e}");
}
