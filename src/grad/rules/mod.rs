//! The adjoint rules: one file per operator family, each with a
//! `register(&mut RuleTable)` that adds its ops (tract's `register_all_ops`
//! layout). A new op is one `register` line plus one function.
//!
//! A rule sees its node through [`Adjoint`]: the gradients of the node's
//! outputs come in, it emits standard ONNX nodes, and hands a gradient to
//! each input that carries one.

pub mod activation;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod shape;

use std::collections::{BTreeMap, HashMap};

use crate::onnx::{AttributeProto, NodeProto};

use super::attrs::{self, node_label, Attrs};
use super::emit::Emitter;
use super::graph::TensorInfo;
use super::GradError;

/// Emits a node's adjoint.
pub type AdjointFn = fn(&mut Adjoint<'_>) -> Result<(), GradError>;

/// One op's adjoint and which of its inputs it differentiates.
#[derive(Clone, Copy)]
pub struct Rule {
    /// Whether input `i` gets a gradient from this rule. A floating-point
    /// input that varies with `x` at a position the rule does not
    /// differentiate is an error, never a silently dropped term.
    pub differentiable: fn(usize) -> bool,
    /// Emits the adjoint.
    pub adjoint: AdjointFn,
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rule")
    }
}

/// Only the first input carries gradient (data input of shape ops, `X` of
/// Conv with constant weights, ...).
pub fn first(i: usize) -> bool {
    i == 0
}

/// Every input carries gradient.
pub fn all(_: usize) -> bool {
    true
}

/// The registry: op type → rule (default domain only).
#[derive(Debug, Default)]
pub struct RuleTable {
    rules: BTreeMap<&'static str, Rule>,
}

impl RuleTable {
    /// Adds or replaces the rule for `op`.
    pub fn register(
        &mut self,
        op: &'static str,
        differentiable: fn(usize) -> bool,
        adjoint: AdjointFn,
    ) {
        self.rules.insert(
            op,
            Rule {
                differentiable,
                adjoint,
            },
        );
    }

    /// The rule for `op`, if covered.
    pub fn get(&self, op: &str) -> Option<&Rule> {
        self.rules.get(op)
    }

    /// Every covered op, sorted.
    pub fn ops(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.rules.keys().copied()
    }

    /// The full table of this crate.
    pub fn standard() -> RuleTable {
        let mut t = RuleTable::default();
        conv::register(&mut t);
        gemm::register(&mut t);
        norm::register(&mut t);
        activation::register(&mut t);
        elementwise::register(&mut t);
        pool::register(&mut t);
        reduce::register(&mut t);
        shape::register(&mut t);
        t
    }
}

/// A rule's view of one node during the reverse sweep.
pub struct Adjoint<'a> {
    /// The node being differentiated.
    pub node: &'a NodeProto,
    /// The default-domain opset the model imports.
    pub opset: i64,
    info: &'a HashMap<String, TensorInfo>,
    active: &'a dyn Fn(&str) -> bool,
    emit: &'a mut Emitter,
    out_grads: Vec<Option<String>>,
    /// Gradients handed to the inputs, by input position.
    pub in_grads: Vec<Option<String>>,
}

impl<'a> Adjoint<'a> {
    /// Sets up the view; `out_grads[i]` is the summed gradient of output
    /// `i`, `None` where nothing downstream uses it.
    pub fn new(
        node: &'a NodeProto,
        opset: i64,
        info: &'a HashMap<String, TensorInfo>,
        active: &'a dyn Fn(&str) -> bool,
        emit: &'a mut Emitter,
        out_grads: Vec<Option<String>>,
    ) -> Self {
        let n = node.input.len();
        Adjoint {
            node,
            opset,
            info,
            active,
            emit,
            out_grads,
            in_grads: vec![None; n],
        }
    }

    /// The node's attributes.
    pub fn attrs(&self) -> Attrs<'a> {
        Attrs::new(self.node, self.opset)
    }

    /// An error about this node.
    pub fn error(&self, detail: impl Into<String>) -> GradError {
        GradError::Rule {
            node: node_label(self.node),
            op: self.node.op_type().to_string(),
            opset: self.opset,
            detail: detail.into(),
        }
    }

    /// Whether input `i` is present (optional inputs may be `""`).
    pub fn has_input(&self, i: usize) -> bool {
        self.node.input.get(i).is_some_and(|s| !s.is_empty())
    }

    /// The name of input `i`.
    pub fn input(&self, i: usize) -> Result<&'a str, GradError> {
        match self.node.input.get(i) {
            Some(s) if !s.is_empty() => Ok(s.as_str()),
            _ => Err(self.error(format!("input {i} is missing"))),
        }
    }

    /// The name of output `i`.
    pub fn output(&self, i: usize) -> Result<&'a str, GradError> {
        match self.node.output.get(i) {
            Some(s) if !s.is_empty() => Ok(s.as_str()),
            _ => Err(self.error(format!("output {i} is missing"))),
        }
    }

    /// Whether input `i` needs a gradient.
    pub fn wants(&self, i: usize) -> bool {
        self.node
            .input
            .get(i)
            .is_some_and(|s| !s.is_empty() && (self.active)(s))
    }

    /// The gradient of output `i`; zeros of its shape where nothing
    /// downstream used it (only multi-output ops reach that case).
    pub fn dy(&mut self, i: usize) -> Result<String, GradError> {
        if let Some(g) = self.out_grads.get(i).cloned().flatten() {
            return Ok(g);
        }
        let y = self.output(i)?.to_string();
        let dtype = self.dtype(&y)?;
        let shape = self.emit.node("Shape", &[&y], vec![]);
        let zero = super::emit::float_tensor("value", dtype, &[0.0], &[1]);
        Ok(self.emit.node(
            "ConstantOfShape",
            &[&shape],
            vec![attrs::tensor("value", zero)],
        ))
    }

    /// Hands `grad` to input `i`, if that input wants one.
    pub fn give(&mut self, i: usize, grad: String) {
        if self.wants(i) {
            self.in_grads[i] = Some(grad);
        }
    }

    fn facts(&self, name: &str) -> Result<&'a TensorInfo, GradError> {
        self.info
            .get(name)
            .ok_or_else(|| self.error(format!("no shape is known for tensor {name:?}")))
    }

    /// The probed shape of a tensor (batch axis at its probe size).
    pub fn shape(&self, name: &str) -> Result<&'a [i64], GradError> {
        Ok(&self.facts(name)?.shape)
    }

    /// The ONNX dtype code of a tensor.
    pub fn dtype(&self, name: &str) -> Result<i32, GradError> {
        Ok(self.facts(name)?.dtype)
    }

    /// The value of a constant integer tensor (folded if need be).
    pub fn const_ints(&self, name: &str) -> Result<Vec<i64>, GradError> {
        let f = self.facts(name)?;
        match (&f.ints, f.constant) {
            (Some(v), true) => Ok(v.clone()),
            _ => Err(self.error(format!(
                "tensor {name:?} must be a constant integer tensor (it depends on the input, so the adjoint's \
                 geometry would change per run)"
            ))),
        }
    }

    /// Input `i` as constant ints, or `None` when the input is absent.
    pub fn opt_const_ints(&self, i: usize) -> Result<Option<Vec<i64>>, GradError> {
        if self.has_input(i) {
            Ok(Some(self.const_ints(self.input(i)?)?))
        } else {
            Ok(None)
        }
    }

    /// Emits a one-output node.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.emit.node(op, inputs, attrs)
    }

    /// Emits a node with `n` outputs.
    pub fn op_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n: usize,
    ) -> Vec<String> {
        self.emit.node_n(op, inputs, attrs, n)
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, v: &[i64]) -> String {
        self.emit.ints(v)
    }

    /// A scalar of `dtype`.
    pub fn scalar(&mut self, dtype: i32, v: f64) -> String {
        self.emit.scalar(dtype, v)
    }

    /// A float tensor constant of `dtype`.
    pub fn constant(&mut self, dtype: i32, values: &[f64], dims: &[i64]) -> String {
        self.emit.const_float(dtype, values, dims)
    }

    /// `Cast(t, to=dtype)`.
    pub fn cast(&mut self, t: &str, dtype: i32) -> String {
        self.op("Cast", &[t], vec![attrs::int("to", i64::from(dtype))])
    }

    /// `Reshape(g, Shape(like))`: gives `g` the runtime shape of `like`.
    pub fn reshape_like(&mut self, g: &str, like: &str) -> String {
        let s = self.op("Shape", &[like], vec![]);
        self.op("Reshape", &[g, &s], vec![])
    }

    /// Sums `grad` (shaped like `grad_like`) down to the shape of `target`,
    /// over the axes along which `target` was broadcast.
    pub fn unbroadcast(
        &mut self,
        grad: &str,
        grad_like: &str,
        target: &str,
    ) -> Result<String, GradError> {
        let gs = self.shape(grad_like)?.to_vec();
        let ts = self.shape(target)?.to_vec();
        if gs == ts {
            return Ok(grad.to_string());
        }
        let lead = gs.len().saturating_sub(ts.len());
        let mut axes: Vec<i64> = (0..lead as i64).collect();
        for (i, &t) in ts.iter().enumerate() {
            if t == 1 && gs[lead + i] != 1 {
                axes.push((lead + i) as i64);
            }
        }
        let summed = if axes.is_empty() {
            grad.to_string()
        } else {
            let a = self.ints(&axes);
            self.op("ReduceSum", &[grad, &a], vec![attrs::int("keepdims", 1)])
        };
        Ok(self.reshape_like(&summed, target))
    }

    /// Emits a per-spatial-axis ConvTranspose that spreads `dy` (output
    /// grid `out`) back onto an input grid of size `input`, with the
    /// forward op's window geometry. `output_padding` is computed, never
    /// `output_shape` (which overrides explicit pads); a remainder that
    /// `output_padding` cannot hold is added by a zero Pad.
    #[allow(clippy::too_many_arguments)]
    pub fn spread(
        &mut self,
        dy: &str,
        weight: &str,
        group: i64,
        geo: &Geometry,
        extra: Vec<AttributeProto>,
    ) -> Result<String, GradError> {
        let n = geo.input.len();
        let mut pads_end = vec![0; n];
        let mut out_pad = vec![0; n];
        let mut tail = vec![0; n];
        for i in 0..n {
            let full =
                (geo.output[i] - 1) * geo.strides[i] + geo.dilations[i] * (geo.kernel[i] - 1) + 1;
            let avail = full - geo.pads_begin[i];
            if avail >= geo.input[i] {
                pads_end[i] = avail - geo.input[i];
            } else {
                let missing = geo.input[i] - avail;
                let limit = geo.strides[i].max(geo.dilations[i]) - 1;
                out_pad[i] = missing.min(limit);
                tail[i] = missing - out_pad[i];
            }
        }
        let mut pads = geo.pads_begin.clone();
        pads.extend(&pads_end);
        let mut a = vec![
            attrs::ints("strides", &geo.strides),
            attrs::ints("dilations", &geo.dilations),
            attrs::ints("kernel_shape", &geo.kernel),
            attrs::ints("pads", &pads),
            attrs::int("group", group),
        ];
        if out_pad.iter().any(|&p| p != 0) {
            a.push(attrs::ints("output_padding", &out_pad));
        }
        a.extend(extra);
        let mut g = self.op("ConvTranspose", &[dy, weight], a);
        if tail.iter().any(|&t| t != 0) {
            let mut p = vec![0; 2 + n];
            p.extend([0, 0]);
            p.extend(&tail);
            let pc = self.ints(&p);
            g = self.op("Pad", &[&g, &pc], vec![]);
        }
        Ok(g)
    }
}

/// The window geometry of a convolution-like op along its spatial axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Input spatial sizes.
    pub input: Vec<i64>,
    /// Output spatial sizes.
    pub output: Vec<i64>,
    /// Kernel sizes.
    pub kernel: Vec<i64>,
    /// Strides.
    pub strides: Vec<i64>,
    /// Dilations.
    pub dilations: Vec<i64>,
    /// Padding before each axis (auto_pad resolved).
    pub pads_begin: Vec<i64>,
    /// Padding after each axis (auto_pad resolved).
    pub pads_end: Vec<i64>,
}

impl Geometry {
    /// Reads `strides`, `dilations`, `pads`/`auto_pad` of a Conv/Pool node
    /// whose spatial sizes and kernel are known.
    pub fn read(
        ad: &Adjoint<'_>,
        input: Vec<i64>,
        output: Vec<i64>,
        kernel: Vec<i64>,
    ) -> Result<Self, GradError> {
        let n = input.len();
        let a = ad.attrs();
        let strides = a.ints_len("strides", n, 1)?;
        let dilations = a.ints_len("dilations", n, 1)?;
        let auto_pad = a.string("auto_pad", "NOTSET")?;
        let (pads_begin, pads_end) = match auto_pad.as_str() {
            "NOTSET" => {
                let pads = a.ints_len("pads", 2 * n, 0)?;
                (pads[..n].to_vec(), pads[n..].to_vec())
            }
            "VALID" => (vec![0; n], vec![0; n]),
            "SAME_UPPER" | "SAME_LOWER" => {
                let mut b = vec![0; n];
                let mut e = vec![0; n];
                for i in 0..n {
                    let total = ((output[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
                        - input[i])
                        .max(0);
                    let small = total / 2;
                    (b[i], e[i]) = if auto_pad == "SAME_UPPER" {
                        (small, total - small)
                    } else {
                        (total - small, small)
                    };
                }
                (b, e)
            }
            other => return Err(a.error("auto_pad", format!("unknown value {other:?}"))),
        };
        Ok(Geometry {
            input,
            output,
            kernel,
            strides,
            dilations,
            pads_begin,
            pads_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_the_issue_list() {
        let t = RuleTable::standard();
        let covered: Vec<&str> = t.ops().collect();
        for op in [
            "Conv",
            "ConvTranspose",
            "Gemm",
            "MatMul",
            "BatchNormalization",
            "Relu",
            "LeakyRelu",
            "PRelu",
            "Clip",
            "Sigmoid",
            "Tanh",
            "HardSigmoid",
            "HardSwish",
            "Softplus",
            "Elu",
            "Erf",
            "Gelu",
            "Add",
            "Sub",
            "Mul",
            "Div",
            "MaxPool",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "ReduceMean",
            "ReduceSum",
            "Flatten",
            "Reshape",
            "Transpose",
            "Squeeze",
            "Unsqueeze",
            "Concat",
            "Split",
            "Slice",
            "Pad",
            "Identity",
            "Dropout",
            "Cast",
        ] {
            assert!(covered.contains(&op), "{op} is not in the rule table");
        }
    }
}
