//! The gradient pass: from an ONNX classifier `f` (input `x`, logits `z`)
//! derive the ODIN perturbation graph `G`, using only standard ONNX ops.
//!
//! `G` takes `x`, `temperature` and `epsilon` and returns `logits` = f(x),
//! `perturbed` = x − ε·sign(∂L/∂x)/std with L = CE(softmax(z/T), argmax z),
//! and optionally the raw `gradient`. ONNX Runtime has no autodiff that
//! stock builds can run, so the adjoint of every node on the path from `x`
//! to `z` is emitted here, in reverse, from a table of exact rules.
//!
//! [`derive`] runs the pass as one function per step, in order: decode
//! (one image input, the opset) → topological order → where the gradient
//! starts (past a trailing Softmax) → which tensors vary with `x` (one
//! memoised sweep) → probe run (constant folding, shapes) →
//! differentiable path → coverage check (one error for every uncovered
//! node) → seed ∂L/∂z → reverse sweep → ODIN outputs → encode. The
//! analysis steps refuse a model before anything is emitted; what they
//! establish travels to the emitting steps in a `Plan`.

#![warn(missing_docs)]

pub mod attrs;
pub mod emit;
pub mod graph;
pub mod rules;
pub mod taps;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use prost::Message;

use crate::onnx::{
    tensor_proto::DataType, GraphProto, ModelProto, NodeProto, TypeProto, ValueInfoProto,
};

use self::attrs::node_label;
use self::emit::Emitter;
use self::graph::{is_float, TensorInfo};
use self::rules::{Adjoint, Rule, RuleTable};

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
    /// The penultimate features of `x` (only with `features`).
    pub const FEATURES: &str = "features";
    /// The model's logits on `perturbed` (only with `fused`).
    pub const PERTURBED_LOGITS: &str = "perturbed_logits";
    /// The penultimate features of `perturbed` (with `fused` and `features`).
    pub const PERTURBED_FEATURES: &str = "perturbed_features";
}

/// What the caller supplies besides the model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GradOptions {
    /// Per-channel std of the input normalisation (one value, or one per
    /// channel), so ε is in [0, 1] pixel units.
    pub std: Vec<f32>,
    /// Also output the raw gradient as `gradient`.
    pub raw_gradient: bool,
    /// The tensor holding the penultimate features (see [`taps`]): also
    /// output as `features` (and, fused, `perturbed_features`).
    pub features: Option<String>,
    /// Append the model's forward pass on `perturbed` (its nodes cloned
    /// with renamed tensors, the weights shared), so that one run gives
    /// `logits`, `perturbed_logits` and the features of both: the fused
    /// serving graph.
    pub fused: bool,
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
    let proto = ModelProto::decode(model)?;
    let mut summary = Summary::default();
    let source = Source::read(&proto)?;
    summary.ops_found = count_ops(source.graph);
    let order = graph::topological_order(source.graph)?;
    let z = gradient_start(source.graph, source.output, &mut summary.notes);
    let varying = varying_with_input(source.graph, &order, source.x, &z)?;
    let table = RuleTable::standard();
    let facts = probe(&source, &order, &table, &z, &varying)?;
    let carries = |_: &NodeProto, o: &str| facts.is_float(o);
    let (active, on_path) =
        differentiable_path(source.graph, &order, &table, source.x, &z, &carries);
    check_coverage(&source, &table, &active, &on_path)?;
    if let Some(f) = &options.features {
        if !facts.info.contains_key(f.as_str()) {
            return Err(GradError::Model(format!(
                "the features tensor {f:?} is not a tensor of the model"
            )));
        }
    }
    let plan = Plan {
        source,
        z,
        order,
        table,
        facts,
        active,
        on_path,
        varying,
    };

    let taken = reserve_names(plan.source.graph, &plan.z)?;
    if let Some(f) = &options.features {
        if f != names::FEATURES && taken.contains(names::FEATURES) {
            return Err(GradError::Model(format!(
                "the model has a tensor named {:?} that is not its features {f:?}",
                names::FEATURES
            )));
        }
    }
    let mut em = Emitter::new(taken);
    let dz = seed(&mut em, &plan.z, &plan.facts.z);
    let g = reverse_sweep(&mut em, &plan, dz, &mut summary.rules_applied)?;
    odin_outputs(&mut em, &plan, &g, options)?;
    if let Some(features) = &options.features {
        if features != names::FEATURES {
            em.node_named("Identity", &[features], vec![], names::FEATURES);
        }
    }
    if options.fused {
        let cloned = forward_on_perturbed(&mut em, &plan, options.features.as_deref());
        summary.notes.push(format!(
            "fused: the model's forward pass on `perturbed` appended ({cloned} nodes, weights shared)"
        ));
    }
    summary.nodes_added = em.nodes.len();
    let outputs = output_signature(&plan.facts, options);
    let bytes = encode(proto, em, outputs)?;
    Ok(Derived { bytes, summary })
}

/// The parts of the model the pass is defined on.
struct Source<'m> {
    /// The whole model (the probe runs it; opsets of other domains).
    proto: &'m ModelProto,
    /// Its graph.
    graph: &'m GraphProto,
    /// The default-domain opset it imports.
    opset: i64,
    /// The one image input.
    input: &'m ValueInfoProto,
    /// That input's name.
    x: &'m str,
    /// The name of the first output (the logits, or what follows them).
    output: &'m str,
}

impl<'m> Source<'m> {
    /// Reads the opset, the image input and the first output. Every later
    /// step assumes a graph, one non-initializer input and an opset the
    /// emitted formulations are written for; refusing here gives one
    /// actionable message instead of a failure deep in the sweep.
    fn read(proto: &'m ModelProto) -> Result<Self, GradError> {
        let opset = default_opset(proto)?;
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
        let input = image_input(graph)?;
        let output = graph
            .output
            .first()
            .ok_or_else(|| GradError::Model("the model has no outputs".into()))?;
        Ok(Source {
            proto,
            graph,
            opset,
            input,
            x: input.name(),
            output: output.name(),
        })
    }
}

/// The default-domain opset, refused below [`MIN_OPSET`]: the rules emit
/// ReduceSum/Unsqueeze/Squeeze/Split with axes as inputs, which older
/// opsets read as attributes.
fn default_opset(proto: &ModelProto) -> Result<i64, GradError> {
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
    Ok(opset)
}

/// The one graph input that is not an initializer: older exporters list
/// weights among the inputs, and ODIN perturbs a single image tensor.
fn image_input(graph: &GraphProto) -> Result<&ValueInfoProto, GradError> {
    let initializers: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name()))
        .collect();
    match inputs.as_slice() {
        [input] => Ok(*input),
        _ => Err(GradError::Model(format!(
            "expected one image input, found {}",
            inputs.len()
        ))),
    }
}

/// Every op of the model with its node count, so the summary shows what
/// the pass saw whether or not it is on the differentiable path.
fn count_ops(graph: &GraphProto) -> BTreeMap<String, usize> {
    let mut ops = BTreeMap::new();
    for node in &graph.node {
        *ops.entry(op_label(node)).or_default() += 1;
    }
    ops
}

/// The tensor the gradient starts from: the first output, or the input of
/// a trailing (Log)Softmax, which is noted. ODIN's loss is the
/// cross-entropy of softmax(z/T) of the logits; through a trailing
/// softmax it would be the cross-entropy of a probability instead.
fn gradient_start(graph: &GraphProto, output: &str, notes: &mut Vec<String>) -> String {
    // The last producer of the name, should a malformed graph have several.
    let producer = graph
        .node
        .iter()
        .rev()
        .find(|n| n.output.iter().any(|o| o == output));
    match producer {
        Some(node)
            if matches!(node.op_type(), "Softmax" | "LogSoftmax") && node.domain().is_empty() =>
        {
            let before = node.input.first().cloned().unwrap_or_default();
            notes.push(format!(
                "the model ends in {} ({}); the gradient starts from its input {before:?}, which is output as `logits`",
                node.op_type(),
                node_label(node)
            ));
            before
        }
        _ => output.to_string(),
    }
}

/// The tensors that vary with `x`. The probe reads the others' integer
/// values as fixed adjoint geometry, and logits that do not vary with `x`
/// have no gradient to take.
fn varying_with_input(
    graph: &GraphProto,
    order: &[usize],
    x: &str,
    z: &str,
) -> Result<HashSet<String>, GradError> {
    let varying = graph::varying(graph, order, x);
    if !varying.contains(z) {
        return Err(GradError::Model(format!(
            "the logits {z:?} do not depend on the input {x:?}"
        )));
    }
    Ok(varying)
}

/// What the probe run established about the tensors.
struct Facts {
    /// Every tensor's dtype, shape and (constant integers) value.
    info: HashMap<String, TensorInfo>,
    /// The image input's.
    x: TensorInfo,
    /// The logits'.
    z: TensorInfo,
}

impl Facts {
    /// Picks out and checks the input's and the logits' facts: the seed
    /// needs float [N, K] logits, the ODIN step a float input.
    fn new(info: HashMap<String, TensorInfo>, x: &str, z: &str) -> Result<Self, GradError> {
        let fact = |name: &str| -> Result<TensorInfo, GradError> {
            info.get(name)
                .cloned()
                .ok_or_else(|| GradError::Model(format!("no shape known for {name:?}")))
        };
        let z_info = fact(z)?;
        let x_info = fact(x)?;
        if z_info.shape.len() != 2 || !is_float(z_info.dtype) {
            return Err(GradError::Model(format!(
                "the logits {z:?} must be a float [N, K] tensor, probed as {:?}",
                z_info.shape
            )));
        }
        if !is_float(x_info.dtype) {
            return Err(GradError::Model(format!("the input {x:?} must be float")));
        }
        Ok(Facts {
            info,
            x: x_info,
            z: z_info,
        })
    }

    /// Whether `name` is a floating-point tensor (integer and boolean
    /// tensors carry no gradient).
    fn is_float(&self, name: &str) -> bool {
        self.info.get(name).is_some_and(|f| is_float(f.dtype))
    }
}

/// Runs the model once for shapes, dtypes and folded constants, which the
/// rules need and ONNX shape inference loses after exporters' unfolded
/// constant chains. When the run fails on ops ONNX Runtime lacks (custom
/// domains), every uncovered node is still reported, judged without
/// dtypes, rather than the runtime's complaint about the first one.
fn probe(
    source: &Source<'_>,
    order: &[usize],
    table: &RuleTable,
    z: &str,
    varying: &HashSet<String>,
) -> Result<Facts, GradError> {
    let info = graph::probe(source.proto, source.input, varying).map_err(|e| {
        let structural = |n: &NodeProto, _: &str| !non_differentiable(n);
        let (_, on_path) =
            differentiable_path(source.graph, order, table, source.x, z, &structural);
        let uncovered = uncovered_nodes(source.proto, source.opset, table, &on_path);
        if uncovered.is_empty() {
            e
        } else {
            GradError::Unsupported(uncovered)
        }
    })?;
    Facts::new(info, source.x, z)
}

/// Refuses the model before anything is emitted when a node on the path
/// has no rule (all such nodes in one error, so a user converting a
/// model sees the whole list at once), or when a covered op is reached
/// through an input its rule does not differentiate, which would lose a
/// term: refuse rather than guess.
fn check_coverage(
    source: &Source<'_>,
    table: &RuleTable,
    active: &HashSet<String>,
    on_path: &[bool],
) -> Result<(), GradError> {
    let uncovered = uncovered_nodes(source.proto, source.opset, table, on_path);
    if !uncovered.is_empty() {
        return Err(GradError::Unsupported(uncovered));
    }
    let on_path_nodes = source
        .graph
        .node
        .iter()
        .zip(on_path)
        .filter(|(_, on)| **on)
        .map(|(n, _)| n);
    for node in on_path_nodes {
        let Some(rule) = covered_rule(table, node) else {
            continue;
        };
        for (k, t) in node.input.iter().enumerate() {
            if !t.is_empty() && !(rule.differentiable)(k) && active.contains(t) {
                return Err(GradError::Rule {
                    node: node_label(node),
                    op: node.op_type().into(),
                    opset: source.opset,
                    detail: format!(
                        "input {k} ({t:?}) depends on the input image, but this rule only \
                         differentiates the other inputs"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What the analysis established, shared by the emitting steps.
struct Plan<'m> {
    /// The model's graph, opset, input and output.
    source: Source<'m>,
    /// The tensor the gradient starts from (the logits).
    z: String,
    /// Node indices, producers before consumers.
    order: Vec<usize>,
    /// The adjoint rules.
    table: RuleTable,
    /// Probed dtypes, shapes and constants.
    facts: Facts,
    /// Tensors that carry gradient.
    active: HashSet<String>,
    /// Per node (by index): whether it lies on a path from `x` to `z`.
    on_path: Vec<bool>,
    /// Tensors that vary with `x`.
    varying: HashSet<String>,
}

/// Every name the model uses, which the emitter must avoid. The derived
/// graph's own inputs and outputs must not shadow the model's tensors;
/// only the logits may already be called `logits`.
fn reserve_names(graph: &GraphProto, z: &str) -> Result<HashSet<String>, GradError> {
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
        names::PERTURBED_LOGITS,
        names::PERTURBED_FEATURES,
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
    Ok(taken)
}

/// Emits ∂L/∂z = (softmax(z/T) − onehot(argmax z)) / T, per image, and
/// returns its name: the loss is ODIN's, with the temperature an input of
/// the derived graph so one graph serves every T.
fn seed(em: &mut Emitter, z: &str, z_info: &TensorInfo) -> String {
    let dt = z_info.dtype;
    let k = z_info.shape[1];
    let t = cast_if(em, names::TEMPERATURE, dt);
    let zt = em.node("Div", &[z, &t], vec![]);
    let p = em.node("Softmax", &[&zt], vec![attrs::int("axis", 1)]);
    let am = em.node(
        "ArgMax",
        &[z],
        vec![attrs::int("axis", 1), attrs::int("keepdims", 1)],
    );
    let classes = em.ints(&(0..k).collect::<Vec<_>>());
    let eq = em.node("Equal", &[&am, &classes], vec![]);
    let onehot = em.node("Cast", &[&eq], vec![attrs::int("to", i64::from(dt))]);
    let diff = em.node("Sub", &[&p, &onehot], vec![]);
    em.node("Div", &[&diff, &t], vec![])
}

/// Emits the adjoint of every node on the path, consumers before
/// producers, and returns the name of ∂L/∂x. A tensor with several
/// consumers gets its contributions summed before its producer's rule
/// runs; `rules_applied` counts the rules used, per op.
fn reverse_sweep(
    em: &mut Emitter,
    plan: &Plan<'_>,
    dz: String,
    rules_applied: &mut BTreeMap<String, usize>,
) -> Result<String, GradError> {
    let mut grads: HashMap<String, Vec<String>> = HashMap::from([(plan.z.clone(), vec![dz])]);
    for &i in plan.order.iter().rev().filter(|&&i| plan.on_path[i]) {
        let node = &plan.source.graph.node[i];
        em.scope = node_label(node).replace(['<', '>', ' ', ','], "_");
        let out_grads: Vec<Option<String>> = node
            .output
            .iter()
            .map(|o| grads.remove(o).map(|v| sum(em, v)))
            .collect();
        let in_grads = adjoint(em, plan, node, out_grads)?;
        for (t, g) in node.input.iter().zip(in_grads) {
            if let Some(g) = g {
                grads.entry(t.clone()).or_default().push(g);
            }
        }
        *rules_applied.entry(node.op_type().to_string()).or_default() += 1;
    }
    em.scope = "odin".into();
    grads
        .remove(plan.source.x)
        .map(|v| sum(em, v))
        .ok_or_else(|| GradError::Model("no gradient reached the input".into()))
}

/// Runs `node`'s rule on the gradients of its outputs and returns the
/// gradients it hands to its inputs, by input position.
fn adjoint(
    em: &mut Emitter,
    plan: &Plan<'_>,
    node: &NodeProto,
    out_grads: Vec<Option<String>>,
) -> Result<Vec<Option<String>>, GradError> {
    let opset = plan.source.opset;
    // Coverage was checked before emitting; this only guards that invariant.
    let rule = *plan.table.get(node.op_type()).ok_or_else(|| {
        GradError::Unsupported(vec![Uncovered {
            node: node_label(node),
            op: op_label(node),
            opset,
        }])
    })?;
    let is_active = |s: &str| plan.active.contains(s);
    let mut ad = Adjoint::new(node, opset, &plan.facts.info, &is_active, em, out_grads);
    (rule.adjoint)(&mut ad)?;
    Ok(std::mem::take(&mut ad.in_grads))
}

/// Emits the derived graph's outputs from the gradient `g`: `perturbed` =
/// x − ε·sign(g)/std (zero counting as +1, as in the reference), the raw
/// `gradient` when asked for, and `logits` when the model's logits have
/// another name.
fn odin_outputs(
    em: &mut Emitter,
    plan: &Plan<'_>,
    g: &str,
    options: &GradOptions,
) -> Result<(), GradError> {
    let (x, z) = (plan.source.x, plan.z.as_str());
    let x_info = &plan.facts.x;
    let c = x_info.shape.get(1).copied().unwrap_or(1);
    let std = channel_std(&options.std, c)?;
    let xdt = x_info.dtype;
    let mut cdims = vec![1i64; x_info.shape.len()];
    if cdims.len() > 1 {
        cdims[1] = c;
    }
    // s = (g ≥ 0 ? 1 : −1)/std, written as mask·(2/std) − 1/std: 2/std is
    // exactly twice 1/std in floating point, so s is bit-identical to the
    // reference's ±1/std.
    let inv: Vec<f64> = if xdt == DataType::Double as i32 {
        std.iter().map(|s| 1.0 / f64::from(*s)).collect()
    } else {
        std.iter().map(|s| f64::from(1.0f32 / *s)).collect()
    };
    let two_inv: Vec<f64> = inv.iter().map(|v| 2.0 * v).collect();
    let one_over = em.const_float(xdt, &inv, &cdims);
    let two_over = em.const_float(xdt, &two_inv, &cdims);
    let zero = em.scalar(xdt, 0.0);
    let ge = em.node("GreaterOrEqual", &[g, &zero], vec![]);
    let mask = em.node("Cast", &[&ge], vec![attrs::int("to", i64::from(xdt))]);
    let scaled = em.node("Mul", &[&mask, &two_over], vec![]);
    let s = em.node("Sub", &[&scaled, &one_over], vec![]);
    let eps = cast_if(em, names::EPSILON, xdt);
    let step = em.node("Mul", &[&eps, &s], vec![]);
    em.node_named("Sub", &[x, &step], vec![], names::PERTURBED);
    if options.raw_gradient {
        em.node_named("Identity", &[g], vec![], names::GRADIENT);
    }
    if z != names::LOGITS {
        em.node_named("Identity", &[z], vec![], names::LOGITS);
    }
    Ok(())
}

/// One std per input channel (a single value is repeated), each finite
/// and positive: ε is meant in [0, 1] pixel units, so the step is divided
/// by the normalisation's std.
fn channel_std(std: &[f32], channels: i64) -> Result<Vec<f32>, GradError> {
    let std = match std.len() {
        1 => vec![std[0]; channels as usize],
        n if n as i64 == channels => std.to_vec(),
        n => {
            return Err(GradError::Std(format!(
                "{n} values given, the input has {channels} channels"
            )))
        }
    };
    if std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        return Err(GradError::Std(format!(
            "every std must be finite and positive: {std:?}"
        )));
    }
    Ok(std)
}

/// The derived graph's outputs, typed like the model's logits and input
/// with a symbolic batch axis, so serving code can read the signature.
fn output_signature(facts: &Facts, options: &GradOptions) -> Vec<ValueInfoProto> {
    let (z, x) = (&facts.z, &facts.x);
    let mut outputs = vec![
        value_info(names::LOGITS, z.dtype, &batch_dims(&z.shape)),
        value_info(names::PERTURBED, x.dtype, &batch_dims(&x.shape)),
    ];
    if options.raw_gradient {
        outputs.push(value_info(names::GRADIENT, x.dtype, &batch_dims(&x.shape)));
    }
    let features = options.features.as_deref().and_then(|f| facts.info.get(f));
    if let Some(h) = features {
        outputs.push(value_info(names::FEATURES, h.dtype, &batch_dims(&h.shape)));
    }
    if options.fused {
        outputs.push(value_info(
            names::PERTURBED_LOGITS,
            z.dtype,
            &batch_dims(&z.shape),
        ));
        if let Some(h) = features {
            outputs.push(value_info(
                names::PERTURBED_FEATURES,
                h.dtype,
                &batch_dims(&h.shape),
            ));
        }
    }
    outputs
}

/// Appends the model's forward pass on `perturbed`: every node of the
/// model that varies with `x` and leads to the logits (or the features) is
/// cloned, its tensors renamed `perturbed/{name}` and `x` replaced by
/// `perturbed`; constants, weights and anything not varying with `x` are
/// shared with the first pass. Outputs `perturbed_logits` (and
/// `perturbed_features`). Returns the number of nodes cloned.
fn forward_on_perturbed(em: &mut Emitter, plan: &Plan<'_>, features: Option<&str>) -> usize {
    let graph = plan.source.graph;
    let x = plan.source.x;
    // The nodes the logits and features need, by a backward walk.
    let mut needed: HashSet<&str> = HashSet::from([plan.z.as_str()]);
    if let Some(f) = features {
        needed.insert(f);
    }
    let mut clone = vec![false; graph.node.len()];
    for &i in plan.order.iter().rev() {
        let node = &graph.node[i];
        if node.output.iter().any(|o| needed.contains(o.as_str()))
            && node.output.iter().any(|o| plan.varying.contains(o))
        {
            clone[i] = true;
            needed.extend(node.input.iter().map(String::as_str));
        }
    }
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut count = 0;
    for &i in plan.order.iter().filter(|&&i| clone[i]) {
        let node = &graph.node[i];
        let mut copy = node.clone();
        for input in copy.input.iter_mut() {
            if input == x {
                *input = names::PERTURBED.to_string();
            } else if let Some(r) = renamed.get(input.as_str()) {
                *input = r.clone();
            }
        }
        for output in copy.output.iter_mut().filter(|o| !o.is_empty()) {
            let fresh = em.rename(&format!("perturbed/{output}"));
            renamed.insert(output.clone(), fresh.clone());
            *output = fresh;
        }
        copy.name = Some(em.rename(&format!("perturbed/{}", node_label(node))));
        em.nodes.push(copy);
        count += 1;
    }
    let z = renamed
        .get(&plan.z)
        .cloned()
        .unwrap_or_else(|| plan.z.clone());
    em.node_named("Identity", &[&z], vec![], names::PERTURBED_LOGITS);
    if let Some(f) = features {
        let h = renamed.get(f).cloned().unwrap_or_else(|| f.to_string());
        em.node_named("Identity", &[&h], vec![], names::PERTURBED_FEATURES);
    }
    count
}

/// `shape` with its first axis symbolic: the probe ran at a batch size of
/// its own choosing, which the signature must not pin.
fn batch_dims(shape: &[i64]) -> Vec<Option<i64>> {
    let mut d: Vec<Option<i64>> = shape.iter().map(|&v| Some(v)).collect();
    if let Some(first) = d.first_mut() {
        *first = None;
    }
    d
}

/// Appends what the emitter built, the two scalar inputs and the new
/// outputs to the model and serialises it: the derived graph keeps the
/// model's own nodes, so its logits are computed exactly as before.
fn encode(
    mut proto: ModelProto,
    em: Emitter,
    outputs: Vec<ValueInfoProto>,
) -> Result<Vec<u8>, GradError> {
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
    graph.node.extend(em.nodes);
    graph.initializer.extend(em.initializers);
    graph.input.push(scalar_input(names::TEMPERATURE));
    graph.input.push(scalar_input(names::EPSILON));
    graph.output = outputs;
    Ok(proto.encode_to_vec())
}

/// Which tensors carry gradient (varying with `x`, reached through a
/// differentiable input of their producer, and accepted by `carries`), and
/// which nodes lie on a path from `x` to `z` through them.
fn differentiable_path(
    graph: &GraphProto,
    order: &[usize],
    table: &RuleTable,
    x: &str,
    z: &str,
    carries: &dyn Fn(&NodeProto, &str) -> bool,
) -> (HashSet<String>, Vec<bool>) {
    let mut active: HashSet<String> = HashSet::from([x.to_string()]);
    for &i in order {
        let node = &graph.node[i];
        let rule = covered_rule(table, node);
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
    covered_rule(table, node).is_some()
}

/// `node`'s rule, if covered: a custom-domain op that shares a name with
/// a standard one is not the standard op.
fn covered_rule<'t>(table: &'t RuleTable, node: &NodeProto) -> Option<&'t Rule> {
    if matches!(node.domain(), "" | "ai.onnx") {
        table.get(node.op_type())
    } else {
        None
    }
}

/// An op as messages name it, with its domain when not the default one,
/// so a vendor op is not mistaken for the standard op of that name.
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

/// `name` cast to `dtype`: the scalar inputs are float, a double model
/// needs them as double.
fn cast_if(em: &mut Emitter, name: &str, dtype: i32) -> String {
    if dtype == DataType::Float as i32 {
        name.to_string()
    } else {
        em.node("Cast", &[name], vec![attrs::int("to", i64::from(dtype))])
    }
}

/// A tensor's declared signature (`None` dims are the symbolic `N`).
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

/// A float scalar graph input (`temperature`, `epsilon`).
fn scalar_input(name: &str) -> ValueInfoProto {
    value_info(name, DataType::Float as i32, &[])
}

#[cfg(test)]
mod tests;
