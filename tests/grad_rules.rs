//! One finite-difference test per adjoint rule: a small model built here
//! (seeded random weights, odd sizes, strides with padding, groups,
//! broadcasting) is derived, and its `gradient` output is compared with
//! central differences of the same loss, L = Σ_images CE(softmax(z/T),
//! argmax z), computed through ONNX Runtime on the plain model.
//!
//! Models run in float64 where ONNX Runtime's CPU kernels exist for every
//! op in the plain and derived graph (step 1e-6, tolerance 1e-6 of the
//! largest derivative: truncation ~h² and rounding ~1e-16/h are both far
//! below it). Otherwise float32 (Conv, ConvTranspose, pools, ...): step
//! 1e-2 and tolerance 5e-3 of the largest derivative, because the logits
//! carry ~1e-7 relative rounding, which central differences divide by 2h
//! (~1e-5 of a gradient of order 0.1), and the O(h²) truncation of a
//! smooth loss at h = 1e-2 stays under ~1e-3 relative. Inputs are drawn at
//! least 0.05 (> h) away from every kink of the op under test.

mod support;

use odin_sidecar::grad::{derive, names, GradError, GradOptions};
use odin_sidecar::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;
use support::*;

const CLASSES: i64 = 5;

fn n(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{}", outputs.first().unwrap_or(&""))).filter(|_| true),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn ai(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
fn ais(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
fn af(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}
fn as_(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// A test network: the body maps `x` to `f`; a random linear head maps
/// `Flatten(f)` to `z`.
struct Case {
    name: &'static str,
    opset: i64,
    x_shape: Vec<i64>,
    nodes: Box<dyn Fn(i32) -> Vec<NodeProto>>,
    /// Random float initializers: name, dims, scale.
    weights: Vec<(&'static str, Vec<i64>, f64)>,
    /// Fixed float initializers.
    fixed: Vec<(&'static str, Vec<i64>, Vec<f64>)>,
    ints: Vec<(&'static str, Vec<i64>, Vec<i64>)>,
    /// Input values where the op has a kink, kept 0.05 away from.
    kinks: Vec<f64>,
    /// Make all input values distinct and 0.05 apart (for max pooling).
    distinct: bool,
    /// Force float32 (op known to lack double kernels).
    f32_only: bool,
    /// The body couples the images of a batch, so finite differences must
    /// run each perturbed input on its own.
    mixes_batch: bool,
}

impl Case {
    /// A copy that only keeps what running the model needs.
    fn clone_shape(&self) -> Case {
        Case::new(self.name, &self.x_shape, |_| vec![])
    }
    fn new(
        name: &'static str,
        x_shape: &[i64],
        nodes: impl Fn(i32) -> Vec<NodeProto> + 'static,
    ) -> Self {
        Case {
            name,
            opset: 17,
            x_shape: x_shape.to_vec(),
            nodes: Box::new(nodes),
            weights: vec![],
            fixed: vec![],
            ints: vec![],
            kinks: vec![],
            distinct: false,
            f32_only: false,
            mixes_batch: false,
        }
    }
    fn w(mut self, name: &'static str, dims: &[i64], scale: f64) -> Self {
        self.weights.push((name, dims.to_vec(), scale));
        self
    }
    fn fixed(mut self, name: &'static str, dims: &[i64], v: &[f64]) -> Self {
        self.fixed.push((name, dims.to_vec(), v.to_vec()));
        self
    }
    fn ints(mut self, name: &'static str, v: &[i64]) -> Self {
        self.ints.push((name, vec![v.len() as i64], v.to_vec()));
        self
    }
    fn kinks(mut self, k: &[f64]) -> Self {
        self.kinks = k.to_vec();
        self
    }
    fn distinct(mut self) -> Self {
        self.distinct = true;
        self
    }
    fn mixes(mut self) -> Self {
        self.mixes_batch = true;
        self
    }
    fn opset(mut self, o: i64) -> Self {
        self.opset = o;
        self
    }
}

fn float_init(name: &str, dt: i32, dims: &[i64], v: &[f64]) -> TensorProto {
    let mut t = TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dt),
        ..Default::default()
    };
    if dt == DataType::Double as i32 {
        t.double_data = v.to_vec();
    } else {
        t.float_data = v.iter().map(|&x| x as f32).collect();
    }
    t
}

fn tensor_type(dt: i32, dims: &[Option<i64>]) -> TypeProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(dt),
            shape: Some(TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|d| Dimension {
                        value: Some(match d {
                            Some(v) => Value::DimValue(*v),
                            None => Value::DimParam("N".into()),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

/// Serialises a model over `nodes` with input `x` (batch dynamic) and the
/// given output.
fn model(
    case: &Case,
    dt: i32,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    output: &str,
) -> Vec<u8> {
    let mut dims: Vec<Option<i64>> = case.x_shape.iter().map(|&d| Some(d)).collect();
    dims[0] = None;
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(case.opset),
        }],
        graph: Some(GraphProto {
            name: Some(case.name.into()),
            node: nodes,
            initializer: inits,
            input: vec![ValueInfoProto {
                name: Some("x".into()),
                r#type: Some(tensor_type(dt, &dims)),
                ..Default::default()
            }],
            output: vec![ValueInfoProto {
                name: Some(output.into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    m.encode_to_vec()
}

/// Builds the body-plus-head model in `dt`.
fn build(case: &Case, dt: i32, x: &[f64]) -> Result<Vec<u8>, String> {
    let mut rng = Rng::new(0x5eed ^ case.name.len() as u64);
    let mut inits = vec![];
    for (name, dims, scale) in &case.weights {
        let len = dims.iter().product::<i64>() as usize;
        inits.push(float_init(name, dt, dims, &rng.vec(len, *scale)));
    }
    for (name, dims, v) in &case.fixed {
        inits.push(float_init(name, dt, dims, v));
    }
    for (name, dims, v) in &case.ints {
        inits.push(TensorProto {
            name: Some(name.to_string()),
            dims: dims.clone(),
            data_type: Some(DataType::Int64 as i32),
            int64_data: v.clone(),
            ..Default::default()
        });
    }
    // The head's width is whatever the body yields: run the body once.
    let body = model(case, dt, (case.nodes)(dt), inits.clone(), "f");
    let mut s = try_session(&body)?;
    let out = if dt == DataType::Double as i32 {
        run::<f64>(&mut s, "x", &case.x_shape, x, &[])
    } else {
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        run::<f32>(&mut s, "x", &case.x_shape, &xf, &[])
    };
    let feat = out[0].len() as i64 / case.x_shape[0];
    // Scaled so logits stay O(1): a saturated softmax has no gradient.
    let a = 2.0 / (feat as f64).sqrt();
    inits.push(float_init(
        "head_w",
        dt,
        &[feat, CLASSES],
        &rng.vec((feat * CLASSES) as usize, a),
    ));
    let mut nodes = (case.nodes)(dt);
    nodes.push(n("Flatten", &["f"], &["flat"], vec![ai("axis", 1)]));
    nodes.push(n("MatMul", &["flat", "head_w"], &["z"], vec![]));
    Ok(model(case, dt, nodes, inits, "z"))
}

fn input(case: &Case) -> Vec<f64> {
    let len = case.x_shape.iter().product::<i64>() as usize;
    let mut rng = Rng::new(42 + case.name.len() as u64);
    if case.distinct {
        // A shuffled grid at least 0.03 (> 2h) apart: no window ties, even
        // after a finite-difference step.
        let step = (4.0 / len as f64).max(0.03);
        let mut v: Vec<f64> = (0..len)
            .map(|i| (i as f64 - len as f64 / 2.0) * step)
            .collect();
        for i in (1..len).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        return v;
    }
    (0..len)
        .map(|_| loop {
            let v = rng.range(-2.0, 2.0);
            if case.kinks.iter().all(|k| (v - k).abs() > 0.05) {
                break v;
            }
        })
        .collect()
}

fn loss(z: &[f64], yhat: &[usize], t: f64) -> f64 {
    z.chunks(CLASSES as usize)
        .zip(yhat)
        .map(|(zi, &y)| {
            let m = zi.iter().cloned().fold(f64::MIN, f64::max);
            let lse = zi.iter().map(|v| ((v - m) / t).exp()).sum::<f64>().ln() + m / t;
            lse - zi[y] / t
        })
        .sum()
}

fn argmax(z: &[f64]) -> Vec<usize> {
    z.chunks(CLASSES as usize)
        .map(|zi| (0..zi.len()).fold(0, |b, i| if zi[i] > zi[b] { i } else { b }))
        .collect()
}

/// Runs `plain` on many inputs at once (stacked along the batch axis).
fn logits<T: Float>(s: &mut ort::session::Session, case: &Case, xs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    if case.mixes_batch {
        return xs
            .iter()
            .map(|x| {
                logits::<T>(
                    s,
                    &Case {
                        mixes_batch: false,
                        ..case.clone_shape()
                    },
                    std::slice::from_ref(x),
                )
                .remove(0)
            })
            .collect();
    }
    let mut shape = case.x_shape.clone();
    shape[0] *= xs.len() as i64;
    let flat: Vec<T> = xs.iter().flatten().map(|&v| T::from_f64(v)).collect();
    let out = run::<T>(s, "x", &shape, &flat, &[]);
    let per = out[0].len() / xs.len();
    out[0].chunks(per).map(<[f64]>::to_vec).collect()
}

/// Derives the case, compares `gradient` with central differences, and
/// returns (dtype used, relative error).
fn check_case(case: Case) -> (&'static str, f64) {
    let x = input(&case);
    let t = 1.0f32;
    let try_dt = |dt: i32| -> Result<(Vec<u8>, Vec<u8>), String> {
        let plain = build(&case, dt, &x)?;
        let d = derive(
            &plain,
            &GradOptions {
                std: vec![1.0],
                raw_gradient: true,
            },
        )
        .map_err(|e| e.to_string())?;
        // Both graphs must load: a missing double kernel shows up here.
        try_session(&plain)?;
        try_session(&d.bytes)?;
        Ok((plain, d.bytes))
    };
    let (dtname, plain, derived) = match (!case.f32_only).then(|| try_dt(DataType::Double as i32)) {
        Some(Ok((p, d))) => ("f64", p, d),
        other => {
            if let Some(Err(e)) = other {
                if !e.contains("NOT_IMPLEMENTED") && !e.contains("Could not find an implementation")
                {
                    panic!("{}: {e}", case.name);
                }
            }
            let (p, d) =
                try_dt(DataType::Float as i32).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            ("f32", p, d)
        }
    };
    let f64_mode = dtname == "f64";
    let (h, tol) = if f64_mode { (1e-6, 1e-6) } else { (1e-2, 5e-3) };
    let mut g_sess = try_session(&derived).unwrap();
    let mut f_sess = try_session(&plain).unwrap();
    let gi = output_index(&g_sess, names::GRADIENT);
    let g = if f64_mode {
        run::<f64>(
            &mut g_sess,
            "x",
            &case.x_shape,
            &x,
            &[("temperature", t), ("epsilon", 0.0)],
        )[gi]
            .clone()
    } else {
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        run::<f32>(
            &mut g_sess,
            "x",
            &case.x_shape,
            &xf,
            &[("temperature", t), ("epsilon", 0.0)],
        )[gi]
            .clone()
    };
    assert_eq!(
        g.len(),
        x.len(),
        "{}: gradient has the input's size",
        case.name
    );
    let base = if f64_mode {
        logits::<f64>(&mut f_sess, &case, std::slice::from_ref(&x))
    } else {
        logits::<f32>(&mut f_sess, &case, std::slice::from_ref(&x))
    };
    let yhat = argmax(&base[0]);
    let mut rng = Rng::new(7);
    let coords: Vec<usize> = if x.len() <= 160 {
        (0..x.len()).collect()
    } else {
        (0..160)
            .map(|_| (rng.next_u64() % x.len() as u64) as usize)
            .collect()
    };
    let mut xs = vec![];
    for &c in &coords {
        for s in [h, -h] {
            let mut xp = x.clone();
            xp[c] += s;
            xs.push(xp);
        }
    }
    let zs = if f64_mode {
        logits::<f64>(&mut f_sess, &case, &xs)
    } else {
        logits::<f32>(&mut f_sess, &case, &xs)
    };
    let mut worst = 0f64;
    let mut scale = 0f64;
    for (k, &c) in coords.iter().enumerate() {
        let fd = (loss(&zs[2 * k], &yhat, f64::from(t))
            - loss(&zs[2 * k + 1], &yhat, f64::from(t)))
            / (2.0 * h);
        scale = scale.max(fd.abs());
        worst = worst.max((fd - g[c]).abs());
    }
    assert!(
        scale > 1e-4,
        "{}: the loss does not depend on the input (max |fd| = {scale})",
        case.name
    );
    let rel = worst / scale;
    eprintln!(
        "{}: {dtname}, max |g - fd| / max |fd| = {rel:.2e} over {} coordinates",
        case.name,
        coords.len()
    );
    assert!(
        rel <= tol,
        "{}: {dtname} relative error {rel:.3e} > {tol:e}",
        case.name
    );
    (dtname, rel)
}

// ---------------------------------------------------------------- conv

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

// ---------------------------------------------------------------- gemm

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

// ---------------------------------------------------------------- norm

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

// ---------------------------------------------------------------- activations

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

// ---------------------------------------------------------------- elementwise

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

// ---------------------------------------------------------------- pools

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
        },
    )
    .expect_err("needs opset 16")
    .to_string();
    assert!(
        e.contains("opset 16") && e.contains("MaxPool, opset 13"),
        "{e}"
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

// ---------------------------------------------------------------- reductions

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

// ---------------------------------------------------------------- shape ops

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

// ---------------------------------------------------------------- whole-graph behaviour

fn derive_case(
    case: &Case,
    dt: i32,
    opts: &GradOptions,
) -> Result<odin_sidecar::grad::Derived, GradError> {
    let x = input(case);
    derive(&build(case, dt, &x).expect("build"), opts)
}

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
        },
    )
    .expect_err("reflect padding is not covered")
    .to_string();
    for part in ["Pad_f", "(Pad, opset 17)", "mode", "reflect"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
}

#[test]
fn trailing_softmax_is_skipped_and_reported() {
    let body = |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1])],
            ),
            n("Relu", &["c"], &["f"], vec![]),
        ]
    };
    let plain_case = Case::new("sm", &[2, 3, 5, 5], body).w("w", &[2, 3, 3, 3], 0.5);
    let x = input(&plain_case);
    let dt = DataType::Float as i32;
    let plain = build(&plain_case, dt, &x).unwrap();
    // The same network with a Softmax appended after the logits.
    let mut m = ModelProto::decode(plain.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node
        .push(n("Softmax", &["z"], &["probs"], vec![ai("axis", 1)]));
    g.output[0].name = Some("probs".into());
    let with_softmax = m.encode_to_vec();
    let opts = GradOptions {
        std: vec![1.0],
        raw_gradient: true,
    };
    let a = derive(&plain, &opts).unwrap();
    let b = derive(&with_softmax, &opts).unwrap();
    assert!(a.summary.notes.is_empty());
    assert!(
        b.summary.notes.iter().any(|n| n.contains("Softmax")),
        "{:?}",
        b.summary.notes
    );
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let run_g = |bytes: &[u8]| {
        let mut s = try_session(bytes).unwrap();
        let (gi, li) = (
            output_index(&s, names::GRADIENT),
            output_index(&s, names::LOGITS),
        );
        let o = run::<f32>(
            &mut s,
            "x",
            &[2, 3, 5, 5],
            &xf,
            &[("temperature", 2.0), ("epsilon", 0.01)],
        );
        (o[gi].clone(), o[li].clone())
    };
    let (ga, la) = run_g(&a.bytes);
    let (gb, lb) = run_g(&b.bytes);
    assert_eq!(la, lb, "logits are the pre-softmax values");
    assert_eq!(ga, gb, "the gradient starts from the pre-softmax logits");
    assert!(ga.iter().any(|v| *v != 0.0));
}

#[test]
fn perturbed_uses_sign_with_zero_as_plus_and_per_channel_std() {
    // The slice drops every other column: those pixels get a zero gradient,
    // whose sign must count as +1.
    let case = Case::new("perturb", &[2, 3, 4, 4], |_| {
        vec![n("Slice", &["x", "st", "en", "ax", "sp"], &["f"], vec![])]
    })
    .ints("st", &[0])
    .ints("en", &[i64::MAX])
    .ints("ax", &[3])
    .ints("sp", &[2]);
    let std = [0.5f32, 0.25, 2.0];
    let x = input(&case);
    let plain = build(&case, DataType::Float as i32, &x).unwrap();
    let d = derive(
        &plain,
        &GradOptions {
            std: std.to_vec(),
            raw_gradient: true,
        },
    )
    .unwrap();
    let mut s = try_session(&d.bytes).unwrap();
    let (gi, pi) = (
        output_index(&s, names::GRADIENT),
        output_index(&s, names::PERTURBED),
    );
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let eps = 0.01f32;
    let o = run::<f32>(
        &mut s,
        "x",
        &[2, 3, 4, 4],
        &xf,
        &[("temperature", 1.0), ("epsilon", eps)],
    );
    let (mut zeros, mut neg) = (0, 0);
    for (i, (&xv, (&g, &p))) in xf.iter().zip(o[gi].iter().zip(&o[pi])).enumerate() {
        let c = (i / 16) % 3;
        let sign = if g >= 0.0 { 1.0f32 } else { -1.0 };
        zeros += usize::from(g == 0.0);
        neg += usize::from(g < 0.0);
        let want = xv - eps * (sign / std[c]);
        assert_eq!(p as f32, want, "element {i}: g = {g}");
    }
    assert_eq!(
        zeros,
        xf.len() / 2,
        "the dropped columns have zero gradient"
    );
    assert!(neg > 0);
}

#[test]
fn bad_std_is_rejected() {
    let case = Case::new("std", &[2, 3, 4], |_| {
        vec![n("Relu", &["x"], &["f"], vec![])]
    });
    for std in [vec![1.0, 2.0], vec![0.0], vec![]] {
        let e = derive_case(
            &case,
            DataType::Float as i32,
            &GradOptions {
                std: std.clone(),
                raw_gradient: false,
            },
        );
        assert!(matches!(e, Err(GradError::Std(_))), "{std:?}: {e:?}");
    }
}

#[test]
fn images_in_a_batch_do_not_mix() {
    // Gradient of image 0 is the same alone and next to another image.
    let case = Case::new("batch", &[2, 3, 6, 6], |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1]), ais("strides", &[2, 2])],
            ),
            n("Relu", &["c"], &["r"], vec![]),
            n("GlobalAveragePool", &["r"], &["f"], vec![]),
        ]
    })
    .w("w", &[4, 3, 3, 3], 0.5);
    let x = input(&case);
    let plain = build(&case, DataType::Float as i32, &x).unwrap();
    let d = derive(
        &plain,
        &GradOptions {
            std: vec![1.0],
            raw_gradient: true,
        },
    )
    .unwrap();
    let mut s = try_session(&d.bytes).unwrap();
    let gi = output_index(&s, names::GRADIENT);
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let both = run::<f32>(
        &mut s,
        "x",
        &[2, 3, 6, 6],
        &xf,
        &[("temperature", 1.0), ("epsilon", 0.0)],
    );
    let one = run::<f32>(
        &mut s,
        "x",
        &[1, 3, 6, 6],
        &xf[..108],
        &[("temperature", 1.0), ("epsilon", 0.0)],
    );
    assert_eq!(&both[gi][..108], &one[gi][..]);
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

#[test]
fn a_fixed_batch_size_is_kept() {
    // Exports often pin the batch to 1; the derived graph keeps that size.
    let case = Case::new("fixed", &[1, 3, 5, 5], |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1]), ais("strides", &[2, 2])],
            ),
            n("Relu", &["c"], &["f"], vec![]),
        ]
    })
    .w("w", &[2, 3, 3, 3], 0.5);
    let x = input(&case);
    let dt = DataType::Float as i32;
    let plain = build(&case, dt, &x).unwrap();
    let mut m = ModelProto::decode(plain.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.input[0].r#type = Some(tensor_type(dt, &[Some(1), Some(3), Some(5), Some(5)]));
    let pinned = m.encode_to_vec();
    let opts = GradOptions {
        std: vec![1.0],
        raw_gradient: true,
    };
    let a = derive(&plain, &opts).unwrap();
    let b = derive(&pinned, &opts).unwrap();
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let grad = |bytes: &[u8]| {
        let mut s = try_session(bytes).unwrap();
        let gi = output_index(&s, names::GRADIENT);
        run::<f32>(
            &mut s,
            "x",
            &[1, 3, 5, 5],
            &xf,
            &[("temperature", 1.0), ("epsilon", 0.0)],
        )[gi]
            .clone()
    };
    let (ga, gb) = (grad(&a.bytes), grad(&b.bytes));
    assert!(ga.iter().any(|v| *v != 0.0));
    assert_eq!(ga, gb);
}
