//! What the pass knows about the model before it emits anything: node
//! order, which tensors vary with the input, constant values, and concrete
//! shapes and dtypes of every tensor.
//!
//! Shapes and constants come from one probe run of the model with ONNX
//! Runtime at batch [`PROBE_BATCH`], with every intermediate tensor exposed
//! as an output. That evaluates the constant subgraphs exporters leave
//! unfolded (the ResNet `pads` chain) with the runtime's own kernels, and
//! gives spatial sizes that ONNX shape inference loses after such chains.
//! Batch 2 rather than 1 so the batch axis is told apart from broadcast
//! axes of size 1.

use std::collections::{HashMap, HashSet};

use ort::value::{Tensor, TensorElementType, ValueType};

use crate::onnx::{tensor_proto::DataType, GraphProto, ModelProto, TensorProto, ValueInfoProto};

use super::GradError;

/// The batch size of the probe run.
pub const PROBE_BATCH: i64 = 2;

/// Facts about one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// ONNX `TensorProto.DataType` code.
    pub dtype: i32,
    /// Shape at batch [`PROBE_BATCH`].
    pub shape: Vec<i64>,
    /// Whether the value is independent of the input (foldable).
    pub constant: bool,
    /// Integer contents, for constant int32/int64 tensors.
    pub ints: Option<Vec<i64>>,
}

/// Whether an ONNX dtype code is a floating-point type (may carry gradient).
pub fn is_float(dtype: i32) -> bool {
    [
        DataType::Float,
        DataType::Double,
        DataType::Float16,
        DataType::Bfloat16,
    ]
    .iter()
    .any(|d| *d as i32 == dtype)
}

/// Indices of `graph.node` in an order where every input is produced
/// before it is consumed (Kahn's algorithm; ONNX requires topological order
/// but files in the wild do not always keep it).
pub fn topological_order(graph: &GraphProto) -> Result<Vec<usize>, GradError> {
    let mut available: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    available.extend(graph.input.iter().map(|i| i.name()));
    available.insert("");
    let mut done = vec![false; graph.node.len()];
    let mut order = Vec::with_capacity(graph.node.len());
    loop {
        let before = order.len();
        for (i, node) in graph.node.iter().enumerate() {
            if !done[i] && node.input.iter().all(|t| available.contains(t.as_str())) {
                done[i] = true;
                order.push(i);
                available.extend(node.output.iter().map(String::as_str));
            }
        }
        if order.len() == graph.node.len() {
            return Ok(order);
        }
        if order.len() == before {
            let stuck = graph
                .node
                .iter()
                .zip(&done)
                .find(|(_, d)| !**d)
                .map(|(n, _)| super::attrs::node_label(n))
                .unwrap_or_default();
            return Err(GradError::Model(format!(
                "the graph has a cycle or an input that nothing produces (first stuck node: {stuck})"
            )));
        }
    }
}

/// Which tensors depend on `input`, in one forward sweep: each tensor is
/// decided once, so residual graphs cost linear time (a recursive "is this
/// constant" query without memoisation revisits both branches of every Add
/// and is exponential in depth).
pub fn varying(graph: &GraphProto, order: &[usize], input: &str) -> HashSet<String> {
    let mut varying = HashSet::from([input.to_string()]);
    for &i in order {
        let node = &graph.node[i];
        if node.input.iter().any(|t| varying.contains(t)) {
            varying.extend(node.output.iter().filter(|o| !o.is_empty()).cloned());
        }
    }
    varying
}

/// Decodes an initializer's integer contents (int32/int64, typed or raw).
pub fn tensor_ints(t: &TensorProto) -> Option<Vec<i64>> {
    let raw = t.raw_data.as_deref();
    match t.data_type() {
        x if x == DataType::Int64 as i32 => match raw {
            Some(b) => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            ),
            None => Some(t.int64_data.clone()),
        },
        x if x == DataType::Int32 as i32 => match raw {
            Some(b) => Some(
                b.chunks_exact(4)
                    .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                    .collect(),
            ),
            None => Some(t.int32_data.iter().map(|&v| i64::from(v)).collect()),
        },
        _ => None,
    }
}

fn onnx_dtype(ty: TensorElementType) -> i32 {
    use TensorElementType as T;
    (match ty {
        T::Float32 => DataType::Float,
        T::Uint8 => DataType::Uint8,
        T::Int8 => DataType::Int8,
        T::Uint16 => DataType::Uint16,
        T::Int16 => DataType::Int16,
        T::Int32 => DataType::Int32,
        T::Int64 => DataType::Int64,
        T::String => DataType::String,
        T::Bool => DataType::Bool,
        T::Float16 => DataType::Float16,
        T::Float64 => DataType::Double,
        T::Uint32 => DataType::Uint32,
        T::Uint64 => DataType::Uint64,
        T::Bfloat16 => DataType::Bfloat16,
        _ => DataType::Undefined,
    }) as i32
}

/// The input's declared element type and shape (-1 for a symbolic axis).
pub fn declared(info: &ValueInfoProto) -> Option<(i32, Vec<i64>)> {
    use crate::onnx::tensor_shape_proto::dimension::Value;
    use crate::onnx::type_proto::Value as Ty;
    let Some(Ty::TensorType(t)) = info.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Value::DimValue(v)) => v,
            _ => -1,
        })
        .collect();
    Some((t.elem_type(), dims))
}

fn runtime_error(e: impl std::fmt::Display) -> GradError {
    GradError::Runtime(e.to_string())
}

/// Runs the model once at batch [`PROBE_BATCH`] (or the input's fixed
/// batch size) on zeros and records every tensor's dtype, shape and (for
/// constant integer tensors) value.
pub fn probe(
    model: &ModelProto,
    input: &ValueInfoProto,
    varying: &HashSet<String>,
) -> Result<HashMap<String, TensorInfo>, GradError> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
    let (elem, dims) = declared(input).ok_or_else(|| {
        GradError::Model(format!("input {:?} is not a ranked tensor", input.name()))
    })?;
    let mut shape = dims.clone();
    for (axis, d) in shape.iter_mut().enumerate() {
        if *d < 0 {
            if axis != 0 {
                return Err(GradError::Model(format!(
                    "input {:?} has a symbolic axis {axis} ({dims:?}); only the batch axis may be dynamic",
                    input.name()
                )));
            }
            *d = PROBE_BATCH;
        }
    }
    if shape.is_empty() {
        return Err(GradError::Model(format!(
            "input {:?} is a scalar",
            input.name()
        )));
    }
    // A fixed batch size (common in exports) is probed as it is: the
    // derived graph then takes that batch size only, like the model.

    let mut info: HashMap<String, TensorInfo> = HashMap::new();
    for t in &graph.initializer {
        info.insert(
            t.name().to_string(),
            TensorInfo {
                dtype: t.data_type(),
                shape: t.dims.clone(),
                constant: true,
                ints: tensor_ints(t),
            },
        );
    }

    let mut probed = model.clone();
    let pg = probed
        .graph
        .as_mut()
        .ok_or_else(|| GradError::Model("the model has no graph".into()))?;
    let mut names: Vec<String> = pg.output.iter().map(|o| o.name().to_string()).collect();
    let mut seen: HashSet<String> = names.iter().cloned().collect();
    for node in &graph.node {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            if seen.insert(o.clone()) {
                names.push(o.clone());
                pg.output.push(ValueInfoProto {
                    name: Some(o.clone()),
                    ..Default::default()
                });
            }
        }
    }
    let mut bytes = Vec::new();
    prost::Message::encode(&probed, &mut bytes).map_err(runtime_error)?;
    // Unoptimized: the probe reads every intermediate tensor as written.
    let options = crate::runtime::SessionOptions {
        optimize: false,
        ..Default::default()
    };
    let mut session = crate::runtime::session(&bytes, &options).map_err(runtime_error)?;
    let n: usize = shape
        .iter()
        .product::<i64>()
        .try_into()
        .map_err(runtime_error)?;
    let outputs = if elem == DataType::Double as i32 {
        let t = Tensor::from_array((shape.clone(), vec![0f64; n])).map_err(runtime_error)?;
        session
            .run(ort::inputs![input.name() => t])
            .map_err(runtime_error)?
    } else if elem == DataType::Float as i32 {
        let t = Tensor::from_array((shape.clone(), vec![0f32; n])).map_err(runtime_error)?;
        session
            .run(ort::inputs![input.name() => t])
            .map_err(runtime_error)?
    } else {
        return Err(GradError::Model(format!(
            "input {:?} must be float or double",
            input.name()
        )));
    };
    for (name, value) in outputs.iter() {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
            continue;
        };
        let constant = !varying.contains(name);
        let ints = match ty {
            TensorElementType::Int64 if constant => value
                .try_extract_tensor::<i64>()
                .ok()
                .map(|(_, v)| v.to_vec()),
            TensorElementType::Int32 if constant => value
                .try_extract_tensor::<i32>()
                .ok()
                .map(|(_, v)| v.iter().map(|&x| i64::from(x)).collect()),
            _ => None,
        };
        info.insert(
            name.to_string(),
            TensorInfo {
                dtype: onnx_dtype(*ty),
                shape: shape.iter().copied().collect(),
                constant,
                ints,
            },
        );
    }
    info.insert(
        input.name().to_string(),
        TensorInfo {
            dtype: elem,
            shape,
            constant: false,
            ints: None,
        },
    );
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::NodeProto;

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn sorts_out_of_order_nodes() {
        let g = GraphProto {
            node: vec![node("Relu", &["a"], &["b"]), node("Neg", &["x"], &["a"])],
            input: vec![ValueInfoProto {
                name: Some("x".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(topological_order(&g).unwrap(), vec![1, 0]);
    }

    #[test]
    fn reports_a_cycle() {
        let g = GraphProto {
            node: vec![node("Relu", &["b"], &["a"]), node("Neg", &["a"], &["b"])],
            ..Default::default()
        };
        assert!(topological_order(&g)
            .unwrap_err()
            .to_string()
            .contains("cycle"));
    }

    #[test]
    fn varying_is_linear_on_deep_residual_chains() {
        // 2^400 paths: a non-memoised recursion would never finish.
        let mut nodes = vec![];
        let mut prev = "x".to_string();
        for i in 0..400 {
            let (a, b, c) = (format!("a{i}"), format!("b{i}"), format!("c{i}"));
            nodes.push(node("Relu", &[&prev], &[&a]));
            nodes.push(node("Neg", &[&prev], &[&b]));
            nodes.push(node("Add", &[&a, &b], &[&c]));
            prev = c;
        }
        nodes.push(node("Shape", &["w"], &["s"]));
        let g = GraphProto {
            node: nodes,
            ..Default::default()
        };
        let order: Vec<usize> = (0..g.node.len()).collect();
        let v = varying(&g, &order, "x");
        assert!(v.contains("c399"));
        assert!(!v.contains("s"));
    }

    #[test]
    fn decodes_raw_and_typed_ints() {
        let raw = TensorProto {
            data_type: Some(DataType::Int64 as i32),
            raw_data: Some([-3i64, 5].iter().flat_map(|v| v.to_le_bytes()).collect()),
            ..Default::default()
        };
        assert_eq!(tensor_ints(&raw), Some(vec![-3, 5]));
        let typed = TensorProto {
            data_type: Some(DataType::Int32 as i32),
            int32_data: vec![7, -1],
            ..Default::default()
        };
        assert_eq!(tensor_ints(&typed), Some(vec![7, -1]));
    }
}
