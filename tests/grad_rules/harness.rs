//! The finite-difference machinery every family uses: a test network
//! ([`Case`]: a body under test plus a seeded random linear head sized by
//! running the body once), inputs drawn away from the op's kinks, the
//! ODIN loss, and [`check_case`], which derives the network and compares
//! its `gradient` output with central differences (float64 when ONNX
//! Runtime has the kernels, else float32; see the crate comment).

use odin_sidecar::grad::{derive, names, GradError, GradOptions};
use odin_sidecar::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;

use crate::common::*;

pub const CLASSES: i64 = 5;

pub fn n(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("{op}_{}", outputs.first().unwrap_or(&""))).filter(|_| true),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn ai(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}
pub fn ais(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}
pub fn af(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}
pub fn as_(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// A test network: the body maps `x` to `f`; a random linear head maps
/// `Flatten(f)` to `z`.
pub struct Case {
    pub name: &'static str,
    pub opset: i64,
    pub x_shape: Vec<i64>,
    pub nodes: Box<dyn Fn(i32) -> Vec<NodeProto>>,
    /// Random float initializers: name, dims, scale.
    pub weights: Vec<(&'static str, Vec<i64>, f64)>,
    /// Fixed float initializers.
    pub fixed: Vec<(&'static str, Vec<i64>, Vec<f64>)>,
    pub ints: Vec<(&'static str, Vec<i64>, Vec<i64>)>,
    /// Input values where the op has a kink, kept 0.05 away from.
    pub kinks: Vec<f64>,
    /// Make all input values distinct and 0.05 apart (for max pooling).
    pub distinct: bool,
    /// Force float32 (op known to lack double kernels).
    pub f32_only: bool,
    /// The body couples the images of a batch, so finite differences must
    /// run each perturbed input on its own.
    pub mixes_batch: bool,
}

impl Case {
    /// A copy that only keeps what running the model needs.
    pub fn clone_shape(&self) -> Case {
        Case::new(self.name, &self.x_shape, |_| vec![])
    }
    pub fn new(
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
    pub fn w(mut self, name: &'static str, dims: &[i64], scale: f64) -> Self {
        self.weights.push((name, dims.to_vec(), scale));
        self
    }
    pub fn fixed(mut self, name: &'static str, dims: &[i64], v: &[f64]) -> Self {
        self.fixed.push((name, dims.to_vec(), v.to_vec()));
        self
    }
    pub fn ints(mut self, name: &'static str, v: &[i64]) -> Self {
        self.ints.push((name, vec![v.len() as i64], v.to_vec()));
        self
    }
    pub fn kinks(mut self, k: &[f64]) -> Self {
        self.kinks = k.to_vec();
        self
    }
    pub fn distinct(mut self) -> Self {
        self.distinct = true;
        self
    }
    pub fn mixes(mut self) -> Self {
        self.mixes_batch = true;
        self
    }
    pub fn opset(mut self, o: i64) -> Self {
        self.opset = o;
        self
    }
}

pub fn float_init(name: &str, dt: i32, dims: &[i64], v: &[f64]) -> TensorProto {
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

pub fn tensor_type(dt: i32, dims: &[Option<i64>]) -> TypeProto {
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
pub fn model(
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
pub fn build(case: &Case, dt: i32, x: &[f64]) -> Result<Vec<u8>, String> {
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

pub fn input(case: &Case) -> Vec<f64> {
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

pub fn loss(z: &[f64], yhat: &[usize], t: f64) -> f64 {
    z.chunks(CLASSES as usize)
        .zip(yhat)
        .map(|(zi, &y)| {
            let m = zi.iter().cloned().fold(f64::MIN, f64::max);
            let lse = zi.iter().map(|v| ((v - m) / t).exp()).sum::<f64>().ln() + m / t;
            lse - zi[y] / t
        })
        .sum()
}

pub fn argmax(z: &[f64]) -> Vec<usize> {
    z.chunks(CLASSES as usize)
        .map(|zi| (0..zi.len()).fold(0, |b, i| if zi[i] > zi[b] { i } else { b }))
        .collect()
}

/// Runs `plain` on many inputs at once (stacked along the batch axis).
pub fn logits<T: Float>(
    s: &mut ort::session::Session,
    case: &Case,
    xs: &[Vec<f64>],
) -> Vec<Vec<f64>> {
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
pub fn check_case(case: Case) -> (&'static str, f64) {
    let x = input(&case);
    let t = 1.0f32;
    let try_dt = |dt: i32| -> Result<(Vec<u8>, Vec<u8>), String> {
        let plain = build(&case, dt, &x)?;
        let d = derive(
            &plain,
            &GradOptions {
                std: vec![1.0],
                raw_gradient: true,
                ..Default::default()
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

pub fn derive_case(
    case: &Case,
    dt: i32,
    opts: &GradOptions,
) -> Result<odin_sidecar::grad::Derived, GradError> {
    let x = input(case);
    derive(&build(case, dt, &x).expect("build"), opts)
}
