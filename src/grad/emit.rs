//! The node builder: appends new nodes and constant initializers to the
//! derived graph under names that cannot collide with the model's own.
//!
//! Nodes emitted for a source node are named `{node}/grad/{k}` (tract's
//! `{name}.suffix` convention), so a profile of the derived graph reads
//! back to the node whose adjoint it is.

use std::collections::HashSet;

use crate::onnx::{tensor_proto::DataType, AttributeProto, NodeProto, TensorProto};

/// Accumulates the nodes and initializers the pass adds.
#[derive(Debug, Default)]
pub struct Emitter {
    /// Nodes added, in emission order (already topologically sorted).
    pub nodes: Vec<NodeProto>,
    /// Constants added.
    pub initializers: Vec<TensorProto>,
    taken: HashSet<String>,
    counter: usize,
    /// Prefix for the next names (the source node's label).
    pub scope: String,
}

impl Emitter {
    /// A builder that avoids every name in `taken`.
    pub fn new(taken: HashSet<String>) -> Self {
        Emitter {
            taken,
            scope: "odin".into(),
            ..Default::default()
        }
    }

    /// A fresh name under the current scope.
    pub fn fresh(&mut self, what: &str) -> String {
        loop {
            self.counter += 1;
            let name = format!("{}/grad/{}{}", self.scope, what, self.counter);
            if self.taken.insert(name.clone()) {
                return name;
            }
        }
    }

    /// `want`, or `want` with a numeric suffix if that is taken; reserved.
    pub fn rename(&mut self, want: &str) -> String {
        let mut name = want.to_string();
        let mut k = 0;
        while !self.taken.insert(name.clone()) {
            k += 1;
            name = format!("{want}#{k}");
        }
        name
    }

    /// Appends a node with `n_out` outputs and returns their names.
    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        n_out: usize,
    ) -> Vec<String> {
        let name = self.fresh(op);
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{name}:{i}")).collect();
        self.taken.extend(outputs.iter().cloned());
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            attribute: attrs,
            ..Default::default()
        });
        outputs
    }

    /// Appends a one-output node and returns its output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let mut out = self.node_n(op, inputs, attrs, 1);
        out.pop().unwrap_or_default()
    }

    /// Appends a node whose single output has a chosen name.
    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        output: &str,
    ) {
        let name = self.fresh(op);
        self.taken.insert(output.to_string());
        self.nodes.push(NodeProto {
            name: Some(name),
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            attribute: attrs,
            ..Default::default()
        });
    }

    /// Adds an int64 constant of shape `dims`.
    pub fn const_i64(&mut self, values: &[i64], dims: &[i64]) -> String {
        let name = self.fresh("const");
        self.initializers.push(TensorProto {
            name: Some(name.clone()),
            dims: dims.to_vec(),
            data_type: Some(DataType::Int64 as i32),
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    /// Adds a 1-D int64 constant.
    pub fn ints(&mut self, values: &[i64]) -> String {
        self.const_i64(values, &[values.len() as i64])
    }

    /// Adds a float constant of ONNX dtype `dtype` (float or double).
    pub fn const_float(&mut self, dtype: i32, values: &[f64], dims: &[i64]) -> String {
        let name = self.fresh("const");
        self.initializers
            .push(float_tensor(&name, dtype, values, dims));
        name
    }

    /// Adds a float scalar of `dtype`.
    pub fn scalar(&mut self, dtype: i32, v: f64) -> String {
        self.const_float(dtype, &[v], &[])
    }
}

/// A float/double tensor proto (other float dtypes are stored as float and
/// would need a Cast; the pass only emits float or double).
pub fn float_tensor(name: &str, dtype: i32, values: &[f64], dims: &[i64]) -> TensorProto {
    let mut t = TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(dtype),
        ..Default::default()
    };
    if dtype == DataType::Double as i32 {
        t.double_data = values.to_vec();
    } else {
        t.data_type = Some(DataType::Float as i32);
        t.float_data = values.iter().map(|&v| v as f32).collect();
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_scoped_and_avoid_taken_ones() {
        let mut e = Emitter::new(HashSet::from(["conv1/grad/Mul1".to_string()]));
        e.scope = "conv1".into();
        let out = e.node("Mul", &["a", "b"], vec![]);
        assert_eq!(out, "conv1/grad/Mul2:0");
        assert_eq!(e.nodes[0].name.as_deref(), Some("conv1/grad/Mul2"));
        let c = e.ints(&[1, 2]);
        assert_eq!(e.initializers[0].name.as_deref(), Some(c.as_str()));
        assert_eq!(e.initializers[0].dims, vec![2]);
    }

    #[test]
    fn float_tensors_keep_double_precision() {
        let t = float_tensor("c", DataType::Double as i32, &[0.1], &[]);
        assert_eq!(t.double_data, vec![0.1]);
        let t = float_tensor("c", DataType::Float as i32, &[0.1], &[1]);
        assert_eq!(t.float_data, vec![0.1f32]);
    }
}
