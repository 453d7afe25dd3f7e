//! Activations and other one-input ops (`src/grad/rules/activation.rs`):
//! each piecewise op is checked with inputs kept away from its kinks;
//! Softmax and LogSoftmax inside the network, and Neg/Exp/Log/Sqrt.

use odin_sidecar::onnx::AttributeProto;

use crate::harness::*;

fn unary(name: &'static str, op: &'static str, attrs: fn() -> Vec<AttributeProto>) -> Case {
    Case::new(name, &[2, 3, 4, 5], move |_| {
        vec![n(op, &["x"], &["f"], attrs())]
    })
}

#[test]
fn relu() {
    check_case(unary("relu", "Relu", Vec::new).kinks(&[0.0]));
}

#[test]
fn leaky_relu() {
    check_case(unary("leaky", "LeakyRelu", || vec![af("alpha", 0.1)]).kinks(&[0.0]));
}

#[test]
fn prelu_broadcast_slope() {
    check_case(
        Case::new("prelu", &[2, 3, 4, 5], |_| {
            vec![n("PRelu", &["x", "slope"], &["f"], vec![])]
        })
        .w("slope", &[3, 1, 1], 0.5)
        .kinks(&[0.0]),
    );
}

#[test]
fn clip_with_bounds() {
    check_case(
        Case::new("clip", &[2, 3, 4, 5], |_| {
            vec![n("Clip", &["x", "lo", "hi"], &["f"], vec![])]
        })
        .fixed("lo", &[], &[-0.5])
        .fixed("hi", &[], &[0.7])
        .kinks(&[-0.5, 0.7]),
    );
}

#[test]
fn sigmoid() {
    check_case(unary("sigmoid", "Sigmoid", Vec::new));
}

#[test]
fn tanh() {
    check_case(unary("tanh", "Tanh", Vec::new));
}

#[test]
fn hard_sigmoid() {
    check_case(
        unary("hsig", "HardSigmoid", || {
            vec![af("alpha", 0.3), af("beta", 0.4)]
        })
        .kinks(&[-0.4 / 0.3, 0.6 / 0.3]),
    );
}

#[test]
fn hard_swish() {
    let mut c = unary("hswish", "HardSwish", Vec::new).kinks(&[-3.0, 3.0]);
    c.opset = 17;
    // Spread inputs past ±3 so all three pieces are exercised.
    c.fixed.push(("k", vec![], vec![2.5]));
    c.nodes = Box::new(|_| {
        vec![
            n("Mul", &["x", "k"], &["xk"], vec![]),
            n("HardSwish", &["xk"], &["f"], vec![]),
        ]
    });
    c.kinks = vec![-3.0 / 2.5, 3.0 / 2.5];
    check_case(c);
}

#[test]
fn softplus() {
    check_case(unary("softplus", "Softplus", Vec::new));
}

#[test]
fn elu() {
    check_case(unary("elu", "Elu", || vec![af("alpha", 0.8)]).kinks(&[0.0]));
}

#[test]
fn erf() {
    check_case(unary("erf", "Erf", Vec::new));
}

#[test]
fn gelu_opset20() {
    check_case(unary("gelu", "Gelu", Vec::new).opset(20));
}

#[test]
fn softmax_and_log_softmax_inside_the_network() {
    check_case(Case::new("softmax_mid", &[2, 3, 4, 5], |_| {
        vec![
            n("Softmax", &["x"], &["s"], vec![ai("axis", 2)]),
            n("LogSoftmax", &["x"], &["l"], vec![ai("axis", -1)]),
            n("Mul", &["s", "l"], &["f"], vec![]),
        ]
    }));
}

#[test]
fn neg_exp_log_sqrt() {
    check_case(
        Case::new("unary_math", &[2, 3, 4], |_| {
            vec![
                n("Mul", &["x", "x"], &["x2"], vec![]),
                n("Add", &["x2", "one"], &["pos"], vec![]),
                n("Sqrt", &["pos"], &["r"], vec![]),
                n("Log", &["pos"], &["lg"], vec![]),
                n("Neg", &["x"], &["nx"], vec![]),
                n("Exp", &["nx"], &["e"], vec![]),
                n("Sum", &["r", "lg", "e", "c"], &["f"], vec![]),
            ]
        })
        .fixed("one", &[], &[1.0])
        .w("c", &[4], 1.0),
    );
}
