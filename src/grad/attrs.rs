//! Attribute getters for the adjoint rules.
//!
//! Every rule reads its node's attributes through [`Attrs`], so a missing or
//! mistyped attribute is reported once, the same way, naming the node, its
//! op and the opset it was read under (as tract's `pb_helpers` do).

use crate::onnx::{AttributeProto, NodeProto};

use super::GradError;

/// Typed access to one node's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a> {
    node: &'a NodeProto,
    opset: i64,
}

impl<'a> Attrs<'a> {
    /// Wraps `node`, read under the default-domain `opset`.
    pub fn new(node: &'a NodeProto, opset: i64) -> Self {
        Attrs { node, opset }
    }

    fn get(&self, name: &str) -> Option<&'a AttributeProto> {
        self.node
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    }

    /// An error about attribute `name` of this node.
    pub fn error(&self, name: &str, detail: impl Into<String>) -> GradError {
        GradError::Attribute {
            node: node_label(self.node),
            op: self.node.op_type().to_string(),
            opset: self.opset,
            attribute: name.to_string(),
            detail: detail.into(),
        }
    }

    /// An integer attribute, or `default` when absent.
    pub fn int(&self, name: &str, default: i64) -> Result<i64, GradError> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => a.i.ok_or_else(|| self.error(name, "expected an integer")),
        }
    }

    /// A float attribute, or `default` when absent.
    pub fn float(&self, name: &str, default: f32) -> Result<f32, GradError> {
        match self.get(name) {
            None => Ok(default),
            Some(a) => a.f.ok_or_else(|| self.error(name, "expected a float")),
        }
    }

    /// A string attribute, or `default` when absent.
    pub fn string(&self, name: &str, default: &str) -> Result<String, GradError> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) => {
                let bytes =
                    a.s.as_ref()
                        .ok_or_else(|| self.error(name, "expected a string"))?;
                String::from_utf8(bytes.clone()).map_err(|_| self.error(name, "not UTF-8"))
            }
        }
    }

    /// An integer-list attribute, `None` when absent.
    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, GradError> {
        Ok(self.get(name).map(|a| a.ints.clone()))
    }

    /// An integer-list attribute that must have `len` entries, or `default`
    /// repeated when absent.
    pub fn ints_len(&self, name: &str, len: usize, default: i64) -> Result<Vec<i64>, GradError> {
        match self.ints(name)? {
            None => Ok(vec![default; len]),
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(self.error(name, format!("expected {len} values, found {}", v.len()))),
        }
    }
}

/// How a node is named in messages: its name, else `op#index` is not
/// available here, so the first output stands in for an unnamed node.
pub fn node_label(node: &NodeProto) -> String {
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!(
            "<unnamed, output {}>",
            node.output.first().map(String::as_str).unwrap_or("?")
        ),
    }
}

/// Builds an integer attribute.
pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// Builds an integer-list attribute.
pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// Builds a float attribute.
pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::attribute_proto::AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// Builds a string attribute.
pub fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::attribute_proto::AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

/// Builds a tensor attribute.
pub fn tensor(name: &str, t: crate::onnx::TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::attribute_proto::AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeProto {
        NodeProto {
            name: Some("conv1".into()),
            op_type: Some("Conv".into()),
            attribute: vec![
                int("group", 2),
                ints("strides", &[2, 2]),
                string("auto_pad", "VALID"),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn reads_values_and_defaults() {
        let n = node();
        let a = Attrs::new(&n, 17);
        assert_eq!(a.int("group", 1).unwrap(), 2);
        assert_eq!(a.int("missing", 7).unwrap(), 7);
        assert_eq!(a.ints_len("strides", 2, 1).unwrap(), vec![2, 2]);
        assert_eq!(a.ints_len("dilations", 2, 1).unwrap(), vec![1, 1]);
        assert_eq!(a.string("auto_pad", "NOTSET").unwrap(), "VALID");
    }

    #[test]
    fn errors_name_node_op_opset_and_attribute() {
        let n = node();
        let e = Attrs::new(&n, 17)
            .ints_len("strides", 3, 1)
            .unwrap_err()
            .to_string();
        for part in ["conv1", "Conv", "17", "strides", "expected 3 values"] {
            assert!(e.contains(part), "{e:?} lacks {part:?}");
        }
        let e = Attrs::new(&n, 17)
            .float("group", 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a float"), "{e}");
    }
}
