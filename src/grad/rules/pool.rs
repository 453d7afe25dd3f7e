//! Pooling. Average pooling spreads each output's gradient evenly over its
//! window (a per-channel ConvTranspose with a constant kernel); max pooling
//! routes it to the element that won, found again with MaxPool's Indices
//! output (flat over the whole NCHW tensor) and scattered back.

use super::{first, Adjoint, Geometry, RuleTable};
use crate::grad::{attrs, GradError};

/// Adds MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool.
pub fn register(t: &mut RuleTable) {
    t.register("MaxPool", first, max_pool);
    t.register("AveragePool", first, average_pool);
    t.register("GlobalAveragePool", first, global_average_pool);
    t.register("GlobalMaxPool", first, global_max_pool);
}

/// Recomputes the pooling with its Indices output (the forward node is
/// kept as it is, so ONNX Runtime still fuses it) and scatter-adds dY at
/// those flat indices: overlapping windows may pick the same element.
/// Before opset 16, non-overlapping windows use MaxUnpool instead.
fn max_pool(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let a = ad.attrs();
    if a.int("storage_order", 0)? != 0 {
        return Err(a.error("storage_order", "only row-major (0) indices are covered"));
    }
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let outs = ad.op_n("MaxPool", &[x], ad.node.attribute.clone(), 2);
    if ad.opset < 16 {
        // No scatter-add before opset 16: MaxUnpool places each gradient at
        // its index, which is exact only when no two windows overlap.
        let n = ad.shape(x)?.len().saturating_sub(2);
        let kernel = a
            .ints("kernel_shape")?
            .ok_or_else(|| a.error("kernel_shape", "missing"))?;
        let strides = a.ints_len("strides", n, 1)?;
        let dilations = a.ints_len("dilations", n, 1)?;
        let disjoint = kernel
            .iter()
            .zip(&strides)
            .zip(&dilations)
            .all(|((k, s), d)| *d == 1 && s >= k);
        if !disjoint {
            return Err(ad.error(
                "overlapping MaxPool windows need ScatterElements with reduction=add (opset 16 or newer)",
            ));
        }
        let dy = ad.dy(0)?;
        let shape = ad.op("Shape", &[x], vec![]);
        let dx = ad.op(
            "MaxUnpool",
            &[&dy, &outs[1], &shape],
            vec![
                attrs::ints("kernel_shape", &kernel),
                attrs::ints("strides", &strides),
            ],
        );
        ad.give(0, dx);
        return Ok(());
    }
    let flat = ad.ints(&[-1]);
    let dy = ad.dy(0)?;
    let g = ad.op("Reshape", &[&dy, &flat], vec![]);
    let idx = ad.op("Reshape", &[&outs[1], &flat], vec![]);
    let size = ad.op("Size", &[x], vec![]);
    let size1 = ad.op("Reshape", &[&size, &flat], vec![]);
    let zero = crate::grad::emit::float_tensor("value", dt, &[0.0], &[1]);
    let zeros = ad.op(
        "ConstantOfShape",
        &[&size1],
        vec![attrs::tensor("value", zero)],
    );
    let s = ad.op(
        "ScatterElements",
        &[&zeros, &idx, &g],
        vec![attrs::int("axis", 0), attrs::string("reduction", "add")],
    );
    let dx = ad.reshape_like(&s, x);
    ad.give(0, dx);
    Ok(())
}

/// How many elements each output position averaged over, per spatial axis
/// (ONNX Runtime's rule: the window clipped to the padded extent when
/// count_include_pad, else to the input itself).
fn counts(geo: &Geometry, include_pad: bool) -> Vec<Vec<i64>> {
    (0..geo.input.len())
        .map(|i| {
            let (lo, hi) = if include_pad {
                (-geo.pads_begin[i], geo.input[i] + geo.pads_end[i])
            } else {
                (0, geo.input[i])
            };
            (0..geo.output[i])
                .map(|o| {
                    let start = o * geo.strides[i] - geo.pads_begin[i];
                    (0..geo.kernel[i])
                        .map(|j| start + j * geo.dilations[i])
                        .filter(|p| (lo..hi).contains(p))
                        .count() as i64
                })
                .collect()
        })
        .collect()
}

fn average_pool(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (x, y) = (ad.input(0)?, ad.output(0)?);
    let xs = ad.shape(x)?.to_vec();
    let ys = ad.shape(y)?.to_vec();
    let a = ad.attrs();
    let n = xs.len().saturating_sub(2);
    let kernel = a
        .ints("kernel_shape")?
        .ok_or_else(|| a.error("kernel_shape", "missing"))?;
    if kernel.len() != n {
        return Err(a.error(
            "kernel_shape",
            format!("has {} axes, the input has {n}", kernel.len()),
        ));
    }
    let include_pad = a.int("count_include_pad", 0)? != 0;
    let geo = Geometry::read(ad, xs[2..].to_vec(), ys[2..].to_vec(), kernel)?;
    let dt = ad.dtype(x)?;
    let per_axis = counts(&geo, include_pad);
    let uniform = per_axis
        .iter()
        .zip(&geo.kernel)
        .all(|(c, k)| c.iter().all(|v| v == k));
    let dy = ad.dy(0)?;
    let scaled = if uniform {
        let k: i64 = geo.kernel.iter().product();
        let s = ad.scalar(dt, 1.0 / k as f64);
        ad.op("Mul", &[&dy, &s], vec![])
    } else {
        // Windows cut by padding or ceil_mode average over fewer elements.
        let mut inv = vec![1.0f64];
        for c in &per_axis {
            inv = inv
                .iter()
                .flat_map(|p| c.iter().map(move |&v| p / v.max(1) as f64))
                .collect();
        }
        let mut dims = vec![1, 1];
        dims.extend(&geo.output);
        let w = ad.constant(dt, &inv, &dims);
        ad.op("Mul", &[&dy, &w], vec![])
    };
    let covers_input = geo.output.iter().all(|&o| o == 1)
        && geo.kernel == geo.input
        && geo.pads_begin.iter().chain(&geo.pads_end).all(|&p| p == 0)
        && geo.dilations.iter().all(|&d| d == 1);
    let dx = if covers_input {
        // One window over the whole map: broadcasting is the cheapest spread.
        let s = ad.op("Shape", &[x], vec![]);
        ad.op("Expand", &[&scaled, &s], vec![])
    } else {
        let c = xs[1];
        let mut wdims = vec![c, 1];
        wdims.extend(&geo.kernel);
        let ones = vec![1.0; (c * geo.kernel.iter().product::<i64>()) as usize];
        let w = ad.constant(dt, &ones, &wdims);
        ad.spread(&scaled, &w, c, &geo, vec![])?
    };
    ad.give(0, dx);
    Ok(())
}

/// dX = broadcast of dY / (H·W).
fn global_average_pool(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let xs = ad.shape(x)?.to_vec();
    let dt = ad.dtype(x)?;
    let hw: i64 = xs[2..].iter().product();
    let s = ad.scalar(dt, 1.0 / hw as f64);
    let dy = ad.dy(0)?;
    let scaled = ad.op("Mul", &[&dy, &s], vec![]);
    let shape = ad.op("Shape", &[x], vec![]);
    let dx = ad.op("Expand", &[&scaled, &shape], vec![]);
    ad.give(0, dx);
    Ok(())
}

/// Routes dY to the first maximum of each channel (ties, such as an
/// all-zero map after ReLU, must not split or duplicate the gradient).
fn global_max_pool(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let nc = ad.ints(&[0, 0, -1]);
    let flat = ad.op("Reshape", &[x, &nc], vec![]);
    let idx = ad.op(
        "ArgMax",
        &[&flat],
        vec![attrs::int("axis", 2), attrs::int("keepdims", 1)],
    );
    let dy = ad.dy(0)?;
    let g = ad.op("Reshape", &[&dy, &nc], vec![]);
    let shape = ad.op("Shape", &[&flat], vec![]);
    let zero = crate::grad::emit::float_tensor("value", dt, &[0.0], &[1]);
    let zeros = ad.op(
        "ConstantOfShape",
        &[&shape],
        vec![attrs::tensor("value", zero)],
    );
    let s = ad.op(
        "ScatterElements",
        &[&zeros, &idx, &g],
        vec![attrs::int("axis", 2)],
    );
    let dx = ad.reshape_like(&s, x);
    ad.give(0, dx);
    Ok(())
}
