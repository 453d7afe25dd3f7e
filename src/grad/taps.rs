//! Feature taps: where a classifier's penultimate features are, found by
//! graph analysis.
//!
//! The feature-space detectors (KNN, ViM, Mahalanobis, ReAct, fDBD) read the
//! penultimate features `h`, the input of the final linear layer
//! `z = W·h + b`, and need `W` and `b` themselves. [`find`] walks back from
//! the logits (past a trailing Softmax, through Identity) to that layer:
//!
//! * `Gemm(h, B, C)` with `transA = 0` and `B` constant: `W = α·B` (or
//!   `α·Bᵀ` without `transB`), `b = β·C` (zeros without `C`);
//! * `Add(MatMul(h, B), C)` (either order) or a bare `MatMul(h, B)` with a
//!   constant `[D, K]` `B`: `W = Bᵀ`, `b = C`;
//!
//! and `h` is the layer's input, the `[N, D]` tensor after any Flatten or
//! Reshape. A model card may name the tensor instead (`"features"`); it
//! must then be that input or reach it through shape-only ops (Flatten,
//! Reshape, Squeeze, Identity), so that `W` and `b` still apply. A model
//! without such a layer is refused with an error that says what was found.

use std::collections::HashMap;

use crate::onnx::{tensor_proto::DataType, GraphProto, ModelProto, NodeProto, TensorProto};

/// Where the features are and the final layer that reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Taps {
    /// The graph tensor read as the features of a frame (its values,
    /// flattened per frame, are `h`).
    pub features: String,
    /// Feature dimension D.
    pub dim: usize,
    /// Number of classes K.
    pub classes: usize,
    /// `W`, K × D row-major, as f32.
    pub fc_weight: Vec<f32>,
    /// `b`, K.
    pub fc_bias: Vec<f32>,
    /// The final layer's node, for messages.
    pub layer: String,
    /// Whether the card named the tensor.
    pub from_card: bool,
}

/// Why no features could be tapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TapError {
    /// The model is not what the analysis can read.
    #[error("no penultimate features: {0}")]
    NotFound(String),
    /// The card names a tensor that cannot serve as the features.
    #[error("the card's features tensor {name:?}: {detail}")]
    Card {
        /// The tensor the card names.
        name: String,
        /// Why it cannot be used.
        detail: String,
    },
    /// The bytes are not an ONNX model.
    #[error("not an ONNX model: {0}")]
    Decode(String),
}

/// Finds the features of the ONNX model `bytes`; `card` is the card's
/// `features` field, when set.
pub fn find_in_bytes(bytes: &[u8], card: Option<&str>) -> Result<Taps, TapError> {
    let proto: ModelProto =
        prost::Message::decode(bytes).map_err(|e| TapError::Decode(e.to_string()))?;
    find(&proto, card)
}

/// Finds the features of `model`; `card` is the card's `features` field.
pub fn find(model: &ModelProto, card: Option<&str>) -> Result<Taps, TapError> {
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| TapError::NotFound("the model has no graph".into()))?;
    let producers: HashMap<&str, &NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    let output = graph
        .output
        .first()
        .ok_or_else(|| TapError::NotFound("the model has no outputs".into()))?
        .name();
    let layer = final_layer(graph, &producers, output)?;
    let taps = match card {
        None => layer,
        Some(name) if name == layer.features => Taps {
            from_card: true,
            ..layer
        },
        Some(name) => {
            let known = producers.contains_key(name)
                || graph.input.iter().any(|i| i.name() == name)
                || graph.initializer.iter().any(|t| t.name() == name);
            if !known {
                return Err(TapError::Card {
                    name: name.into(),
                    detail: "the model has no such tensor".into(),
                });
            }
            // Walk from the layer's input back through shape-only ops.
            let mut t = layer.features.as_str();
            loop {
                if t == name {
                    break;
                }
                match producers.get(t) {
                    Some(n)
                        if is_default(n)
                            && matches!(
                                n.op_type(),
                                "Flatten" | "Reshape" | "Squeeze" | "Identity"
                            ) =>
                    {
                        t = n.input.first().map(String::as_str).unwrap_or_default();
                    }
                    _ => {
                        return Err(TapError::Card {
                            name: name.into(),
                            detail: format!(
                                "it does not reach the input {:?} of the final layer {} through \
                                 Flatten/Reshape/Squeeze/Identity only, so that layer's W and b \
                                 do not apply to it",
                                layer.features, layer.layer
                            ),
                        })
                    }
                }
            }
            Taps {
                features: name.to_string(),
                from_card: true,
                ..layer
            }
        }
    };
    Ok(taps)
}

fn is_default(node: &NodeProto) -> bool {
    matches!(node.domain(), "" | "ai.onnx")
}

/// The final linear layer on the path to `output`.
fn final_layer(
    graph: &GraphProto,
    producers: &HashMap<&str, &NodeProto>,
    output: &str,
) -> Result<Taps, TapError> {
    let constant = |name: &str| constant_tensor(graph, producers, name);
    let mut t = output;
    // Past a trailing (Log)Softmax and Identity.
    let node = loop {
        let node = producers.get(t).copied().ok_or_else(|| {
            TapError::NotFound(format!("the output {t:?} is not computed by any node"))
        })?;
        if is_default(node) && matches!(node.op_type(), "Identity" | "Softmax" | "LogSoftmax") {
            t = node.input.first().map(String::as_str).unwrap_or_default();
            continue;
        }
        break node;
    };
    let label = crate::grad::attrs::node_label(node);
    let not_linear = || {
        TapError::NotFound(format!(
            "the logits come from {label} ({}), not from a Gemm or MatMul(+Add) with constant \
             weights; name the features tensor in the model card (\"features\") if the model has one",
            node.op_type()
        ))
    };
    if !is_default(node) {
        return Err(not_linear());
    }
    match node.op_type() {
        "Gemm" => {
            let attr_i = |n: &str, d: i64| {
                node.attribute
                    .iter()
                    .find(|a| a.name() == n)
                    .map_or(d, |a| a.i())
            };
            let attr_f = |n: &str, d: f32| {
                node.attribute
                    .iter()
                    .find(|a| a.name() == n)
                    .map_or(d, |a| a.f())
            };
            if attr_i("transA", 0) != 0 {
                return Err(TapError::NotFound(format!(
                    "the final Gemm {label} has transA = 1"
                )));
            }
            let h = node.input.first().cloned().unwrap_or_default();
            let b_name = node.input.get(1).map(String::as_str).unwrap_or_default();
            let (b_dims, b) = constant(b_name).ok_or_else(|| {
                TapError::NotFound(format!(
                    "the final Gemm {label} has a weight {b_name:?} that is not a constant"
                ))
            })?;
            let [r, c] = b_dims[..] else {
                return Err(TapError::NotFound(format!(
                    "the final Gemm {label} has a weight of shape {b_dims:?}"
                )));
            };
            let alpha = attr_f("alpha", 1.0);
            let beta = attr_f("beta", 1.0);
            let trans_b = attr_i("transB", 0) != 0;
            let (k, d) = if trans_b { (r, c) } else { (c, r) };
            let mut w = vec![0.0f32; k * d];
            for i in 0..k {
                for j in 0..d {
                    let v = if trans_b { b[i * c + j] } else { b[j * c + i] };
                    w[i * d + j] = alpha * v;
                }
            }
            let bias = match node.input.get(2).filter(|s| !s.is_empty()) {
                None => vec![0.0; k],
                Some(c_name) => {
                    let (_, cv) = constant(c_name).ok_or_else(|| {
                        TapError::NotFound(format!(
                            "the final Gemm {label} has a bias {c_name:?} that is not a constant"
                        ))
                    })?;
                    broadcast_bias(&cv, k, &label)?
                        .into_iter()
                        .map(|v| beta * v)
                        .collect()
                }
            };
            Ok(Taps {
                features: h,
                dim: d,
                classes: k,
                fc_weight: w,
                fc_bias: bias,
                layer: label,
                from_card: false,
            })
        }
        "Add" | "MatMul" => {
            let (matmul, bias) = if node.op_type() == "MatMul" {
                (node, None)
            } else {
                let a = node.input.first().map(String::as_str).unwrap_or_default();
                let c = node.input.get(1).map(String::as_str).unwrap_or_default();
                let mm = |t: &str| {
                    producers
                        .get(t)
                        .copied()
                        .filter(|n| is_default(n) && n.op_type() == "MatMul")
                };
                match (mm(a), mm(c)) {
                    (Some(m), _) => (m, Some(c)),
                    (None, Some(m)) => (m, Some(a)),
                    (None, None) => return Err(not_linear()),
                }
            };
            let mlabel = crate::grad::attrs::node_label(matmul);
            let h = matmul.input.first().cloned().unwrap_or_default();
            let b_name = matmul.input.get(1).map(String::as_str).unwrap_or_default();
            let (b_dims, b) = constant(b_name).ok_or_else(not_linear)?;
            let [d, k] = b_dims[..] else {
                return Err(TapError::NotFound(format!(
                    "the final MatMul {mlabel} has a weight of shape {b_dims:?}, not [D, K]"
                )));
            };
            let mut w = vec![0.0f32; k * d];
            for i in 0..k {
                for j in 0..d {
                    w[i * d + j] = b[j * k + i];
                }
            }
            let bias = match bias {
                None => vec![0.0; k],
                Some(c_name) => {
                    let (_, cv) = constant(c_name).ok_or_else(not_linear)?;
                    broadcast_bias(&cv, k, &label)?
                }
            };
            Ok(Taps {
                features: h,
                dim: d,
                classes: k,
                fc_weight: w,
                fc_bias: bias,
                layer: mlabel,
                from_card: false,
            })
        }
        _ => Err(not_linear()),
    }
}

/// A bias of K values, or one value repeated.
fn broadcast_bias(c: &[f32], k: usize, label: &str) -> Result<Vec<f32>, TapError> {
    match c.len() {
        n if n == k => Ok(c.to_vec()),
        1 => Ok(vec![c[0]; k]),
        n => Err(TapError::NotFound(format!(
            "the final layer {label} has a bias of {n} values for {k} classes"
        ))),
    }
}

/// The dims and f32 values of a constant: an initializer or the output of
/// a `Constant` node.
fn constant_tensor(
    graph: &GraphProto,
    producers: &HashMap<&str, &NodeProto>,
    name: &str,
) -> Option<(Vec<usize>, Vec<f32>)> {
    let tensor = graph
        .initializer
        .iter()
        .find(|t| t.name() == name)
        .cloned()
        .or_else(|| {
            let node = producers.get(name)?;
            if !(is_default(node) && node.op_type() == "Constant") {
                return None;
            }
            node.attribute
                .iter()
                .find(|a| a.name() == "value")
                .and_then(|a| a.t.clone())
        })?;
    let dims = tensor
        .dims
        .iter()
        .map(|d| usize::try_from(*d).ok())
        .collect::<Option<Vec<usize>>>()?;
    let values = tensor_f32(&tensor)?;
    (values.len() == dims.iter().product::<usize>()).then_some((dims, values))
}

/// A float or double tensor's values as f32.
pub fn tensor_f32(t: &TensorProto) -> Option<Vec<f32>> {
    let raw = t.raw_data.as_deref();
    match t.data_type() {
        x if x == DataType::Float as i32 => Some(match raw {
            Some(b) => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            None => t.float_data.clone(),
        }),
        x if x == DataType::Double as i32 => Some(match raw {
            Some(b) => b
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            None => t.double_data.iter().map(|v| *v as f32).collect(),
        }),
        _ => None,
    }
}

/// `model` with the features tensor also output, under its own name: the
/// plain forward session that gives logits and features in one run.
pub fn with_features_output(model: &[u8], taps: &Taps) -> Result<Vec<u8>, TapError> {
    let mut proto: ModelProto =
        prost::Message::decode(model).map_err(|e| TapError::Decode(e.to_string()))?;
    let graph = proto
        .graph
        .as_mut()
        .ok_or_else(|| TapError::NotFound("the model has no graph".into()))?;
    if !graph.output.iter().any(|o| o.name() == taps.features) {
        graph.output.push(crate::onnx::ValueInfoProto {
            name: Some(taps.features.clone()),
            ..Default::default()
        });
    }
    Ok(prost::Message::encode_to_vec(&proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_model_has_a_final_gemm() {
        let taps = find_in_bytes(crate::model::DEFAULT_MODEL_ONNX, None).unwrap();
        assert_eq!(
            (taps.features.as_str(), taps.dim, taps.classes),
            ("flat", 128, 10)
        );
        assert_eq!(taps.fc_weight.len(), 1280);
        assert!(!taps.from_card);
        // The card may name the same tensor, or the one before the Flatten.
        let same = find_in_bytes(crate::model::DEFAULT_MODEL_ONNX, Some("flat")).unwrap();
        assert!(same.from_card && same.fc_weight == taps.fc_weight);
        let gap = find_in_bytes(crate::model::DEFAULT_MODEL_ONNX, Some("gap")).unwrap();
        assert_eq!((gap.features.as_str(), gap.dim), ("gap", 128));
        // Not a tensor on the way, or none at all.
        let e = find_in_bytes(crate::model::DEFAULT_MODEL_ONNX, Some("relu3")).unwrap_err();
        assert!(e.to_string().contains("does not reach"), "{e}");
        let e = find_in_bytes(crate::model::DEFAULT_MODEL_ONNX, Some("nope")).unwrap_err();
        assert!(e.to_string().contains("no such tensor"), "{e}");
    }
}
