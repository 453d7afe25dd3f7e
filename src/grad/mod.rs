//! The gradient pass: from an ONNX classifier `f` (input `x`, logits `z`)
//! derive the ODIN perturbation graph `G`, using only standard ONNX ops.
//!
//! `G` takes `x`, `temperature` and `epsilon` and returns `logits` = f(x),
//! `perturbed` = x − ε·sign(∂L/∂x)/std with L = CE(softmax(z/T), argmax z),
//! and optionally the raw `gradient`. ONNX Runtime has no autodiff that
//! stock builds can run, so the adjoint of every node on the path from `x`
//! to `z` is emitted here, in reverse, from a table of exact rules.
//!
//! The pass, in order: decode → topological order → which tensors vary
//! with `x` (one memoised sweep) → probe run (constant folding, shapes) →
//! differentiable path → coverage check (one error for every uncovered
//! node) → seed ∂L/∂z → reverse sweep → ODIN outputs → encode.

#![warn(missing_docs)]

pub mod attrs;
pub mod emit;
pub mod graph;
pub mod rules;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use prost::Message;

use crate::onnx::{tensor_proto::DataType, ModelProto, NodeProto, TypeProto, ValueInfoProto};

use self::attrs::node_label;
use self::emit::Emitter;
use self::graph::{is_float, TensorInfo};
use self::rules::{Adjoint, RuleTable};

/// The oldest default-domain opset the emitted formulations are written
/// for (axes as inputs of ReduceSum/Unsqueeze/Squeeze/Split).
pub const MIN_OPSET: i64 = 13;

/// Names of the derived graph's extra inputs and outputs.
pub mod names {
    /// Softmax temperature input (f32 scalar).
    pub const TEMPERATURE: &str = "temperature";
    /// Perturbation magnitude input (f32 scalar).
    pub const EPSILON: &str = "epsilon";
    /// The model's logits on `x`.
    pub const LOGITS: &str = "logits";
    /// `x − ε·sign(g)/std`.
    pub const PERTURBED: &str = "perturbed";
    /// The raw gradient `g` (only with `raw_gradient`).
    pub const GRADIENT: &str = "gradient";
}

/// What the caller supplies besides the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GradOptions {
    /// Per-channel std of the input normalisation (one value, or one per
    /// channel), so ε is in [0, 1] pixel units.
    pub std: Vec<f32>,
    /// Also output the raw gradient as `gradient`.
    pub raw_gradient: bool,
}

/// What the pass did, for the CLI and logs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Every op in the model with its node count.
    pub ops_found: BTreeMap<String, usize>,
    /// Ops on the differentiable path whose adjoint was emitted, with counts.
    pub rules_applied: BTreeMap<String, usize>,
    /// Nodes the pass added (seed, adjoints, outputs).
    pub nodes_added: usize,
    /// Things the user should know (e.g. a trailing Softmax was skipped).
    pub notes: Vec<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k}×{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "ops found:     {}", list(&self.ops_found))?;
        writeln!(f, "rules applied: {}", list(&self.rules_applied))?;
        writeln!(f, "nodes added:   {}", self.nodes_added)?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// The derived graph and what was done.
#[derive(Debug, Clone)]
pub struct Derived {
    /// The serialized ODIN perturbation graph.
    pub bytes: Vec<u8>,
    /// What the pass found and did.
    pub summary: Summary,
}

/// A node the rule table does not cover, on the differentiable path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uncovered {
    /// Node name (or a stand-in naming its output).
    pub node: String,
    /// Op type (with domain when not the default one).
    pub op: String,
    /// The opset the model imports for that domain.
    pub opset: i64,
}

impl fmt::Display for Uncovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, opset {})", self.node, self.op, self.opset)
    }
}

/// Why a gradient graph could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum GradError {
    /// The bytes are not an ONNX model.
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The model is not a classifier the pass can handle.
    #[error("unsupported model: {0}")]
    Model(String),
    /// Nodes on the path from the input to the logits have no adjoint rule.
    #[error(
        "no gradient rule for {} node(s) on the path from the input to the logits: {}",
        .0.len(),
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Unsupported(Vec<Uncovered>),
    /// A node's attribute is missing or malformed.
    #[error("node {node} ({op}, opset {opset}), attribute '{attribute}': {detail}")]
    Attribute {
        /// The node.
        node: String,
        /// Its op.
        op: String,
        /// The opset.
        opset: i64,
        /// The attribute.
        attribute: String,
        /// What is wrong.
        detail: String,
    },
    /// A covered op is used in a way its rule does not handle.
    #[error("node {node} ({op}, opset {opset}): {detail}")]
    Rule {
        /// The node.
        node: String,
        /// Its op.
        op: String,
        /// The opset.
        opset: i64,
        /// What is not supported.
        detail: String,
    },
    /// The normalisation std does not fit the input.
    #[error("invalid std: {0}")]
    Std(String),
    /// ONNX Runtime failed while probing the model.
    #[error("ONNX Runtime (probing the model): {0}")]
    Runtime(String),
}

/// Derives the ODIN perturbation graph of `model` (ONNX bytes).
pub fn derive(model: &[u8], options: &GradOptions) -> Result<Derived, GradError> {
    let mut proto = ModelProto::decode(model)?;
    let opset = proto
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty() || o.domain() == "ai.onnx")
        .map(|o| o.version())
        .ok_or_else(|| GradError::Model("the model imports no default-domain opset".into()))?;
    if opset < MIN_OPSET {
        return Err(GradError::Model(format!(
            "opset {opset} is older than {MIN_OPSET}; convert the model (e.g. onnx.version_converter) first"
        )));
    }
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(GradError::Model(format!(
            "expected one image input, found {}",
            inputs.len()
        )));
    };
    let input = (*input).clone();
    let x = input.name().to_string();
    let first_output = graph
        .output
        .first()
        .ok_or_else(|| GradError::Model("the model has no outputs".into()))?;
    let mut summary = Summary::default();
    for node in &graph.node {
        *summary.ops_found.entry(op_label(node)).or_default() += 1;
    }

    let order = graph::topological_order(graph)?;
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();

    // Differentiate from the logits: a trailing (Log)Softmax would turn
    // the loss into CE of a probability, not of the logits ODIN means.
    let mut z = first_output.name().to_string();
    if let Some(&p) = producer.get(z.as_str()) {
        let node = &graph.node[p];
        if matches!(node.op_type(), "Softmax" | "LogSoftmax") && node.domain().is_empty() {
            let before = node.input.first().cloned().unwrap_or_default();
            summary.notes.push(format!(
                "the model ends in {} ({}); the gradient starts from its input {before:?}, which is output as `logits`",
                node.op_type(),
                node_label(node)
            ));
            z = before;
        }
    }

    let varying = graph::varying(graph, &order, &x);
    if !varying.contains(&z) {
        return Err(GradError::Model(format!(
            "the logits {z:?} do not depend on the input {x:?}"
        )));
    }
    let table = RuleTable::standard();
    let info = match graph::probe(&proto, &input, &varying) {
        Ok(info) => info,
        Err(e) => {
            // The probe cannot run ops ONNX Runtime lacks (custom domains):
            // still report every uncovered node, judged without dtypes.
            let structural = |n: &NodeProto, _: &str| !non_differentiable(n);
            let (_, on_path) = differentiable_path(graph, &order, &table, &x, &z, &structural);
            let uncovered = uncovered_nodes(&proto, opset, &table, &on_path);
            return Err(if uncovered.is_empty() {
                e
            } else {
                GradError::Unsupported(uncovered)
            });
        }
    };
    let fact = |name: &str| -> Result<&TensorInfo, GradError> {
        info.get(name)
            .ok_or_else(|| GradError::Model(format!("no shape known for {name:?}")))
    };
    let z_info = fact(&z)?.clone();
    let x_info = fact(&x)?.clone();
    if z_info.shape.len() != 2 || !is_float(z_info.dtype) {
        return Err(GradError::Model(format!(
            "the logits {z:?} must be a float [N, K] tensor, probed as {:?}",
            z_info.shape
        )));
    }
    if !is_float(x_info.dtype) {
        return Err(GradError::Model(format!("the input {x:?} must be float")));
    }

    let float_output = |_: &NodeProto, o: &str| info.get(o).is_some_and(|f| is_float(f.dtype));
    let (active, on_path) = differentiable_path(graph, &order, &table, &x, &z, &float_output);
    let uncovered = uncovered_nodes(&proto, opset, &table, &on_path);
    if !uncovered.is_empty() {
        return Err(GradError::Unsupported(uncovered));
    }
    // A covered op reached through an input its rule does not
    // differentiate would lose a term: refuse rather than guess.
    for node in graph
        .node
        .iter()
        .zip(&on_path)
        .filter(|(_, on)| **on)
        .map(|(n, _)| n)
    {
        let Some(rule) = covered(&table, node)
            .then(|| table.get(node.op_type()))
            .flatten()
        else {
            continue;
        };
        for (k, t) in node.input.iter().enumerate() {
            if !t.is_empty() && !(rule.differentiable)(k) && active.contains(t) {
                return Err(GradError::Rule {
                    node: node_label(node),
                    op: node.op_type().into(),
                    opset,
                    detail: format!(
                        "input {k} ({t:?}) depends on the input image, but this rule only \
                         differentiates the other inputs"
                    ),
                });
            }
        }
    }

    // Names the derived graph adds must not shadow the model's tensors.
    let mut taken: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    taken.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    taken.extend(graph.input.iter().map(|t| t.name().to_string()));
    for n in [
        names::TEMPERATURE,
        names::EPSILON,
        names::PERTURBED,
        names::GRADIENT,
    ] {
        if taken.contains(n) {
            return Err(GradError::Model(format!(
                "the model already has a tensor named {n:?}"
            )));
        }
    }
    if z != names::LOGITS && taken.contains(names::LOGITS) {
        return Err(GradError::Model(format!(
            "the model has a tensor named {:?} that is not its logits",
            names::LOGITS
        )));
    }
    let mut em = Emitter::new(taken);

    // Seed: ∂L/∂z = (softmax(z/T) − onehot(argmax z)) / T, per image.
    let dt = z_info.dtype;
    let k = z_info.shape[1];
    let t = cast_if(&mut em, names::TEMPERATURE, dt);
    let zt = em.node("Div", &[&z, &t], vec![]);
    let p = em.node("Softmax", &[&zt], vec![attrs::int("axis", 1)]);
    let am = em.node(
        "ArgMax",
        &[&z],
        vec![attrs::int("axis", 1), attrs::int("keepdims", 1)],
    );
    let classes = em.ints(&(0..k).collect::<Vec<_>>());
    let eq = em.node("Equal", &[&am, &classes], vec![]);
    let onehot = em.node("Cast", &[&eq], vec![attrs::int("to", i64::from(dt))]);
    let diff = em.node("Sub", &[&p, &onehot], vec![]);
    let dz = em.node("Div", &[&diff, &t], vec![]);

    let mut grads: HashMap<String, Vec<String>> = HashMap::from([(z.clone(), vec![dz])]);
    let is_active = |s: &str| active.contains(s);
    for &i in order.iter().rev() {
        if !on_path[i] {
            continue;
        }
        let node = &graph.node[i];
        em.scope = node_label(node).replace(['<', '>', ' ', ','], "_");
        let mut outs = vec![];
        for o in &node.output {
            outs.push(grads.remove(o).map(|v| sum(&mut em, v)));
        }
        // Coverage was checked above; this only guards that invariant.
        let rule = *table.get(node.op_type()).ok_or_else(|| {
            GradError::Unsupported(vec![Uncovered {
                node: node_label(node),
                op: op_label(node),
                opset,
            }])
        })?;
        let mut ad = Adjoint::new(node, opset, &info, &is_active, &mut em, outs);
        (rule.adjoint)(&mut ad)?;
        let in_grads = std::mem::take(&mut ad.in_grads);
        for (t, g) in node.input.iter().zip(in_grads) {
            if let Some(g) = g {
                grads.entry(t.clone()).or_default().push(g);
            }
        }
        *summary
            .rules_applied
            .entry(node.op_type().to_string())
            .or_default() += 1;
    }
    em.scope = "odin".into();
    let g = grads
        .remove(&x)
        .map(|v| sum(&mut em, v))
        .ok_or_else(|| GradError::Model("no gradient reached the input".into()))?;

    // perturbed = x − ε·s with s = (g ≥ 0 ? 1 : −1)/std, written as
    // mask·(2/std) − 1/std: 2/std is exactly twice 1/std in floating point,
    // so s is bit-identical to the reference's ±1/std.
    let c = x_info.shape.get(1).copied().unwrap_or(1);
    let std = match options.std.len() {
        1 => vec![options.std[0]; c as usize],
        n if n as i64 == c => options.std.clone(),
        n => {
            return Err(GradError::Std(format!(
                "{n} values given, the input has {c} channels"
            )))
        }
    };
    if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(GradError::Std(format!(
            "every std must be finite and positive: {std:?}"
        )));
    }
    let xdt = x_info.dtype;
    let mut cdims = vec![1i64; x_info.shape.len()];
    if cdims.len() > 1 {
        cdims[1] = c;
    }
    let inv: Vec<f64> = if xdt == DataType::Double as i32 {
        std.iter().map(|s| 1.0 / f64::from(*s)).collect()
    } else {
        std.iter().map(|s| f64::from(1.0f32 / *s)).collect()
    };
    let two_inv: Vec<f64> = inv.iter().map(|v| 2.0 * v).collect();
    let one_over = em.const_float(xdt, &inv, &cdims);
    let two_over = em.const_float(xdt, &two_inv, &cdims);
    let zero = em.scalar(xdt, 0.0);
    let ge = em.node("GreaterOrEqual", &[&g, &zero], vec![]);
    let mask = em.node("Cast", &[&ge], vec![attrs::int("to", i64::from(xdt))]);
    let scaled = em.node("Mul", &[&mask, &two_over], vec![]);
    let s = em.node("Sub", &[&scaled, &one_over], vec![]);
    let eps = cast_if(&mut em, names::EPSILON, xdt);
    let step = em.node("Mul", &[&eps, &s], vec![]);
    em.node_named("Sub", &[&x, &step], vec![], names::PERTURBED);
    if options.raw_gradient {
        em.node_named("Identity", &[&g], vec![], names::GRADIENT);
    }
    if z != names::LOGITS {
        em.node_named("Identity", &[&z], vec![], names::LOGITS);
    }

    summary.nodes_added = em.nodes.len();
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
    graph.node.extend(std::mem::take(&mut em.nodes));
    graph
        .initializer
        .extend(std::mem::take(&mut em.initializers));
    graph.input.push(scalar_input(names::TEMPERATURE));
    graph.input.push(scalar_input(names::EPSILON));
    let batch_dims = |shape: &[i64]| {
        let mut d: Vec<Option<i64>> = shape.iter().map(|&v| Some(v)).collect();
        if let Some(first) = d.first_mut() {
            *first = None;
        }
        d
    };
    let mut outputs = vec![
        value_info(names::LOGITS, dt, &batch_dims(&z_info.shape)),
        value_info(names::PERTURBED, xdt, &batch_dims(&x_info.shape)),
    ];
    if options.raw_gradient {
        outputs.push(value_info(names::GRADIENT, xdt, &batch_dims(&x_info.shape)));
    }
    graph.output = outputs;
    Ok(Derived {
        bytes: proto.encode_to_vec(),
        summary,
    })
}

/// Which tensors carry gradient (varying with `x`, reached through a
/// differentiable input of their producer, and accepted by `carries`), and
/// which nodes lie on a path from `x` to `z` through them.
fn differentiable_path(
    graph: &crate::onnx::GraphProto,
    order: &[usize],
    table: &RuleTable,
    x: &str,
    z: &str,
    carries: &dyn Fn(&NodeProto, &str) -> bool,
) -> (HashSet<String>, Vec<bool>) {
    let mut active: HashSet<String> = HashSet::from([x.to_string()]);
    for &i in order {
        let node = &graph.node[i];
        let rule = covered(table, node)
            .then(|| table.get(node.op_type()))
            .flatten();
        let feeds = node.input.iter().enumerate().any(|(k, t)| {
            !t.is_empty() && active.contains(t) && rule.is_none_or(|r| (r.differentiable)(k))
        });
        if feeds {
            for o in node.output.iter().filter(|o| !o.is_empty()) {
                if carries(node, o) {
                    active.insert(o.clone());
                }
            }
        }
    }
    let mut needed: HashSet<String> = HashSet::from([z.to_string()]);
    let mut on_path = vec![false; graph.node.len()];
    for &i in order.iter().rev() {
        let node = &graph.node[i];
        if node.output.iter().any(|o| needed.contains(o))
            && node.output.iter().any(|o| active.contains(o))
        {
            on_path[i] = true;
            for t in node.input.iter().filter(|t| active.contains(*t)) {
                needed.insert(t.clone());
            }
        }
    }
    (active, on_path)
}

/// Every node on the path without a rule, in graph order.
fn uncovered_nodes(
    proto: &ModelProto,
    opset: i64,
    table: &RuleTable,
    on_path: &[bool],
) -> Vec<Uncovered> {
    let Some(graph) = proto.graph.as_ref() else {
        return vec![];
    };
    graph
        .node
        .iter()
        .zip(on_path)
        .filter(|(node, on)| **on && !covered(table, node))
        .map(|(node, _)| Uncovered {
            node: node_label(node),
            op: op_label(node),
            opset: proto
                .opset_import
                .iter()
                .find(|o| o.domain() == node.domain())
                .map(|o| o.version())
                .unwrap_or(opset),
        })
        .collect()
}

/// Ops whose outputs never carry gradient (integer or boolean results),
/// for judging coverage when dtypes are unknown.
fn non_differentiable(node: &NodeProto) -> bool {
    matches!(node.domain(), "" | "ai.onnx")
        && matches!(
            node.op_type(),
            "Shape"
                | "Size"
                | "ArgMax"
                | "ArgMin"
                | "Equal"
                | "Greater"
                | "GreaterOrEqual"
                | "Less"
                | "LessOrEqual"
                | "Not"
                | "And"
                | "Or"
                | "Xor"
                | "NonZero"
                | "IsNaN"
                | "IsInf"
        )
}

/// Whether `node` is in the default domain, where the rule table applies.
fn covered(table: &RuleTable, node: &NodeProto) -> bool {
    matches!(node.domain(), "" | "ai.onnx") && table.get(node.op_type()).is_some()
}

fn op_label(node: &NodeProto) -> String {
    match node.domain() {
        "" | "ai.onnx" => node.op_type().to_string(),
        d => format!("{d}.{}", node.op_type()),
    }
}

/// Sums gradient contributions of a tensor with several consumers.
fn sum(em: &mut Emitter, mut parts: Vec<String>) -> String {
    if parts.len() == 1 {
        return parts.pop().unwrap_or_default();
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    em.node("Sum", &refs, vec![])
}

fn cast_if(em: &mut Emitter, name: &str, dtype: i32) -> String {
    if dtype == DataType::Float as i32 {
        name.to_string()
    } else {
        em.node("Cast", &[name], vec![attrs::int("to", i64::from(dtype))])
    }
}

fn value_info(name: &str, dtype: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    use crate::onnx::tensor_shape_proto::{dimension::Value, Dimension};
    use crate::onnx::{type_proto, TensorShapeProto};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => Value::DimValue(*v),
                None => Value::DimParam("N".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn scalar_input(name: &str) -> ValueInfoProto {
    value_info(name, DataType::Float as i32, &[])
}

#[cfg(test)]
mod tests;
