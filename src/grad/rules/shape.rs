//! Ops that move elements without changing them: reshapes, transposes,
//! concatenation and splitting, slicing and padding, identity-like ops.
//! Each adjoint moves the gradient back to where the element came from
//! and leaves zeros where nothing went.

use super::{first, Adjoint, RuleTable};
use crate::grad::{attrs, GradError};

/// Adds the shape and data-movement ops.
pub fn register(t: &mut RuleTable) {
    for op in ["Flatten", "Reshape", "Squeeze", "Unsqueeze"] {
        t.register(op, first, reshape);
    }
    t.register("Identity", first, identity);
    t.register("Dropout", first, dropout);
    t.register("Cast", first, cast);
    t.register("Transpose", first, transpose);
    t.register("Concat", super::all, concat);
    t.register("Split", first, split);
    t.register("Slice", first, slice);
    t.register("Pad", first, pad);
}

/// Same elements in another shape: `Reshape(dY, Shape(x))`.
fn reshape(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dy = ad.dy(0)?;
    let dx = ad.reshape_like(&dy, x);
    ad.give(0, dx);
    Ok(())
}

fn identity(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    ad.give(0, dy);
    Ok(())
}

/// Inference-mode Dropout is the identity; training mode is refused.
fn dropout(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    if ad.has_input(2) {
        let t = ad.input(2)?;
        let training = ad.const_ints(t).ok();
        if training.as_deref() != Some(&[0]) {
            return Err(ad.error(
                "Dropout in training mode (or with a non-constant training_mode) is not covered",
            ));
        }
    }
    identity(ad)
}

/// Casts dY back to the input's float type.
fn cast(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let (dx_t, dy_t) = (ad.dtype(x)?, ad.dtype(ad.output(0)?)?);
    let dy = ad.dy(0)?;
    let dx = if dx_t == dy_t { dy } else { ad.cast(&dy, dx_t) };
    ad.give(0, dx);
    Ok(())
}

/// The inverse permutation.
fn transpose(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let rank = ad.shape(ad.input(0)?)?.len();
    let perm = ad
        .attrs()
        .ints("perm")?
        .unwrap_or_else(|| (0..rank as i64).rev().collect());
    let mut inv = vec![0i64; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        let slot = inv
            .get_mut(p as usize)
            .ok_or_else(|| ad.attrs().error("perm", "out of range"))?;
        *slot = i as i64;
    }
    let dy = ad.dy(0)?;
    let dx = ad.op("Transpose", &[&dy], vec![attrs::ints("perm", &inv)]);
    ad.give(0, dx);
    Ok(())
}

fn norm_axis(ad: &Adjoint<'_>, axis: i64, rank: usize) -> Result<usize, GradError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a <= 0 || a >= rank as i64 {
        return Err(ad.error(format!(
            "axis {axis} is the batch axis or out of range; not covered"
        )));
    }
    Ok(a as usize)
}

/// One Split of dY at the inputs' (static) sizes along the axis.
fn concat(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    let rank = ad.shape(y)?.len();
    let axis = norm_axis(ad, ad.attrs().int("axis", 0)?, rank)?;
    let n = ad.node.input.len();
    let mut sizes = vec![];
    for i in 0..n {
        sizes.push(ad.shape(ad.input(i)?)?[axis]);
    }
    let dy = ad.dy(0)?;
    let split = ad.ints(&sizes);
    let parts = ad.op_n(
        "Split",
        &[&dy, &split],
        vec![attrs::int("axis", axis as i64)],
        n,
    );
    for (i, p) in parts.into_iter().enumerate() {
        ad.give(i, p);
    }
    Ok(())
}

/// Concat of the outputs' gradients (zeros for unused outputs).
fn split(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let rank = ad.shape(x)?.len();
    let axis = ad.attrs().int("axis", 0)?;
    let axis = if axis < 0 { axis + rank as i64 } else { axis };
    let mut parts = vec![];
    for i in 0..ad.node.output.len() {
        parts.push(ad.dy(i)?);
    }
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let dx = ad.op("Concat", &refs, vec![attrs::int("axis", axis)]);
    ad.give(0, dx);
    Ok(())
}

/// Constant-mode Pad: `Pad(dY, −pads)` crops what was added (and, for a
/// forward crop, pads zeros back), in one node.
fn pad(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let mode = ad.attrs().string("mode", "constant")?;
    if mode != "constant" {
        return Err(ad.attrs().error(
            "mode",
            format!("{mode:?} is not covered, only \"constant\""),
        ));
    }
    let pads = ad.const_ints(ad.input(1)?)?;
    let neg: Vec<i64> = pads.iter().map(|p| -p).collect();
    let dy = ad.dy(0)?;
    let nc = ad.ints(&neg);
    let mut inputs = vec![dy.as_str(), nc.as_str()];
    if ad.has_input(3) {
        // Same axes; the fill value stays the default zero.
        inputs.extend(["", ad.input(3)?]);
    }
    let dx = ad.op("Pad", &inputs, vec![]);
    ad.give(0, dx);
    Ok(())
}

/// Where one sliced axis's elements came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    axis: usize,
    /// Input position of the lowest selected element.
    first: i64,
    /// Distance between selected elements (|step|).
    stride: i64,
    /// Whether the slice walked the axis backwards.
    reversed: bool,
    /// Zeros to add after the last selected element.
    after: i64,
}

/// Resolves one (start, end, step) against an axis of length `dim` that
/// yielded `m` elements, with ONNX's clamping rules.
fn place(axis: usize, start: i64, step: i64, dim: i64, m: i64) -> Placement {
    let s = if start < 0 { start + dim } else { start };
    let s = if step > 0 {
        s.clamp(0, dim)
    } else {
        s.clamp(0, dim - 1)
    };
    let first = if step > 0 { s } else { s + (m - 1) * step };
    let stride = step.abs();
    Placement {
        axis,
        first,
        stride,
        reversed: step < 0,
        after: dim - first - ((m - 1) * stride + 1),
    }
}

/// Scatters dY back to the sliced positions. Strided spatial axes use a
/// per-channel 1×1 ConvTranspose with the slice's stride (fast on ONNX
/// Runtime); other strided axes interleave zeros by Unsqueeze/Pad/Reshape;
/// a final Pad puts the block at its offset.
fn slice(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (x, y) = (ad.input(0)?, ad.output(0)?);
    let xs = ad.shape(x)?.to_vec();
    let ys = ad.shape(y)?.to_vec();
    let rank = xs.len();
    let starts = ad.const_ints(ad.input(1)?)?;
    let axes = ad
        .opt_const_ints(3)?
        .unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = ad
        .opt_const_ints(4)?
        .unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || steps.len() != starts.len() {
        return Err(ad.error("starts, axes and steps differ in length"));
    }
    let mut places = vec![];
    for ((&st, &ax), &step) in starts.iter().zip(&axes).zip(&steps) {
        let axis = if ax < 0 { ax + rank as i64 } else { ax } as usize;
        if axis >= rank {
            return Err(ad.error(format!("axis {ax} out of range")));
        }
        if ys[axis] == 0 {
            return Err(ad.error("an empty slice is not covered"));
        }
        if axis == 0 && ys[0] != xs[0] {
            return Err(ad.error("slicing the batch axis is not covered"));
        }
        if axis == 0 {
            continue;
        }
        places.push(place(axis, st, step, xs[axis], ys[axis]));
    }
    let dt = ad.dtype(x)?;
    let mut g = ad.dy(0)?;
    let rev: Vec<i64> = places
        .iter()
        .filter(|p| p.reversed)
        .map(|p| p.axis as i64)
        .collect();
    if !rev.is_empty() {
        let n = rev.len();
        let (s, e, a, st) = (
            ad.ints(&vec![-1; n]),
            ad.ints(&vec![i64::MIN; n]),
            ad.ints(&rev),
            ad.ints(&vec![-1; n]),
        );
        g = ad.op("Slice", &[&g, &s, &e, &a, &st], vec![]);
    }
    let mut after: Vec<i64> = vec![0; rank];
    let mut before: Vec<i64> = vec![0; rank];
    for p in &places {
        after[p.axis] = p.after;
        before[p.axis] = p.first;
    }
    let strided: Vec<&Placement> = places.iter().filter(|p| p.stride > 1).collect();
    let spatial_only = strided.iter().all(|p| p.axis >= 2) && (3..=5).contains(&rank);
    if !strided.is_empty() && spatial_only {
        let c = ys[1];
        let n = rank - 2;
        let mut strides = vec![1; n];
        let mut out_pad = vec![0; n];
        for p in &strided {
            let i = p.axis - 2;
            strides[i] = p.stride;
            out_pad[i] = p.after.clamp(0, p.stride - 1);
            after[p.axis] -= out_pad[i];
        }
        let mut wd = vec![c, 1];
        wd.extend(vec![1; n]);
        let w = ad.constant(dt, &vec![1.0; c as usize], &wd);
        g = ad.op(
            "ConvTranspose",
            &[&g, &w],
            vec![
                attrs::ints("strides", &strides),
                attrs::ints("kernel_shape", &vec![1; n]),
                attrs::ints("output_padding", &out_pad),
                attrs::int("group", c),
            ],
        );
    } else {
        let mut cur: Vec<i64> = ys.clone();
        cur[0] = 0;
        for p in &strided {
            let u = ad.ints(&[p.axis as i64 + 1]);
            let un = ad.op("Unsqueeze", &[&g, &u], vec![]);
            let mut pads = vec![0; 2 * (rank + 1)];
            pads[rank + 1 + p.axis + 1] = p.stride - 1;
            let pc = ad.ints(&pads);
            let padded = ad.op("Pad", &[&un, &pc], vec![]);
            cur[p.axis] *= p.stride;
            let sc = ad.ints(&cur);
            g = ad.op("Reshape", &[&padded, &sc], vec![]);
            after[p.axis] -= p.stride - 1;
        }
    }
    if before.iter().chain(&after).any(|&v| v != 0) {
        let mut pads = before;
        pads.extend(after);
        let pc = ad.ints(&pads);
        g = ad.op("Pad", &[&g, &pc], vec![]);
    }
    ad.give(0, g);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_strided_and_reversed_slices() {
        // x[::2] of 32: 0, 2, .., 30; one zero after.
        assert_eq!(
            place(2, 0, 2, 32, 16),
            Placement {
                axis: 2,
                first: 0,
                stride: 2,
                reversed: false,
                after: 1
            }
        );
        // x[7:1:-3] of 9: 7, 4 → lowest 4.
        assert_eq!(
            place(1, 7, -3, 9, 2),
            Placement {
                axis: 1,
                first: 4,
                stride: 3,
                reversed: true,
                after: 1
            }
        );
        // x[-1::-1] of 5: the whole axis reversed.
        assert_eq!(
            place(1, -1, -1, 5, 5),
            Placement {
                axis: 1,
                first: 0,
                stride: 1,
                reversed: true,
                after: 0
            }
        );
        // start past the end clamps.
        assert_eq!(place(1, 100, -2, 6, 3).first, 1);
    }
}
