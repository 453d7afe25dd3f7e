//! Convolutions. The adjoint of Conv with respect to its input is a
//! ConvTranspose with the same weights, strides, dilations, pads and group;
//! the adjoint of ConvTranspose is the matching Conv. Weights and bias are
//! constants of the classifier and get no gradient.

use super::{first, Adjoint, Geometry, RuleTable};
use crate::grad::{attrs, GradError};

/// Adds Conv and ConvTranspose.
pub fn register(t: &mut RuleTable) {
    t.register("Conv", first, conv);
    t.register("ConvTranspose", first, conv_transpose);
}

fn kernel(ad: &Adjoint<'_>, w: &str, spatial: usize) -> Result<Vec<i64>, GradError> {
    let ws = ad.shape(w)?;
    let from_w = ws.get(2..).map(<[i64]>::to_vec).unwrap_or_default();
    let k = ad.attrs().ints("kernel_shape")?.unwrap_or(from_w);
    if k.len() != spatial {
        return Err(ad.error(format!(
            "kernel has {} axes, the input has {spatial} spatial axes",
            k.len()
        )));
    }
    Ok(k)
}

/// dX = ConvTranspose(dY, W) with `output_padding` = what the forward
/// floor division dropped, so the result has exactly X's size.
fn conv(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (x, w, y) = (ad.input(0)?, ad.input(1)?, ad.output(0)?);
    let xs = ad.shape(x)?.to_vec();
    let ys = ad.shape(y)?.to_vec();
    let spatial = xs.len().saturating_sub(2);
    let geo = Geometry::read(
        ad,
        xs[2..].to_vec(),
        ys[2..].to_vec(),
        kernel(ad, w, spatial)?,
    )?;
    let group = ad.attrs().int("group", 1)?;
    let dy = ad.dy(0)?;
    let dx = match flipped_pads(&geo) {
        Some(pads) => {
            let wf = flipped_weights(ad, w, group)?;
            ad.op(
                "Conv",
                &[&dy, &wf],
                vec![
                    attrs::ints("pads", &pads),
                    attrs::ints("dilations", &geo.dilations),
                    attrs::ints("kernel_shape", &geo.kernel),
                    attrs::int("group", group),
                ],
            )
        }
        None => ad.spread(&dy, w, group, &geo, vec![])?,
    };
    ad.give(0, dx);
    Ok(())
}

/// For a stride-1 convolution, the adjoint is itself a convolution with
/// the kernel flipped and pads d·(k−1) − p; measured faster than
/// ConvTranspose on ONNX Runtime CPU. `None` when strided or when a pad
/// exceeds d·(k−1) (the adjoint would need negative pads).
fn flipped_pads(geo: &Geometry) -> Option<Vec<i64>> {
    if geo.strides.iter().any(|&s| s != 1) {
        return None;
    }
    let n = geo.input.len();
    let reach = |i: usize| geo.dilations[i] * (geo.kernel[i] - 1);
    let mut pads: Vec<i64> = (0..n).map(|i| reach(i) - geo.pads_begin[i]).collect();
    pads.extend((0..n).map(|i| reach(i) - geo.pads_end[i]));
    pads.iter().all(|&p| p >= 0).then_some(pads)
}

/// W[M, C/g, k…] → W'[C, M/g, k…] with the spatial axes reversed, emitted
/// as ops on the constant weight, which ONNX Runtime folds when it loads
/// the graph (the file holds one copy of the weights).
fn flipped_weights(ad: &mut Adjoint<'_>, w: &str, group: i64) -> Result<String, GradError> {
    let ws = ad.shape(w)?.to_vec();
    let (m, cg) = (ws[0], ws[1]);
    let spatial = ws.len() - 2;
    let k = &ws[2..];
    let swapped = if group == 1 {
        let mut perm: Vec<i64> = vec![1, 0];
        perm.extend(2..ws.len() as i64);
        ad.op("Transpose", &[w], vec![attrs::ints("perm", &perm)])
    } else if cg == 1 && m == group {
        // Depthwise: W is already [C, 1, k…].
        w.to_string()
    } else {
        let mut grouped = vec![group, m / group, cg];
        grouped.extend(k);
        let gshape = ad.ints(&grouped);
        let r = ad.op("Reshape", &[w, &gshape], vec![]);
        let mut perm: Vec<i64> = vec![0, 2, 1];
        perm.extend(3..3 + spatial as i64);
        let t = ad.op("Transpose", &[&r], vec![attrs::ints("perm", &perm)]);
        let mut out = vec![group * cg, m / group];
        out.extend(k);
        let oshape = ad.ints(&out);
        ad.op("Reshape", &[&t, &oshape], vec![])
    };
    let axes: Vec<i64> = (2..ws.len() as i64).collect();
    let (st, en, ax, sp) = (
        ad.ints(&vec![-1; spatial]),
        ad.ints(&vec![i64::MIN; spatial]),
        ad.ints(&axes),
        ad.ints(&vec![-1; spatial]),
    );
    Ok(ad.op("Slice", &[&swapped, &st, &en, &ax, &sp], vec![]))
}

/// dX = Conv(dY, W) with the forward strides, dilations, pads and group.
fn conv_transpose(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (x, w, y) = (ad.input(0)?, ad.input(1)?, ad.output(0)?);
    let xs = ad.shape(x)?.to_vec();
    let ys = ad.shape(y)?.to_vec();
    let spatial = xs.len().saturating_sub(2);
    let a = ad.attrs();
    if a.ints("output_shape")?.is_some() || a.string("auto_pad", "NOTSET")? != "NOTSET" {
        return Err(ad.error(
            "ConvTranspose with output_shape or auto_pad is not covered; give explicit pads",
        ));
    }
    let k = kernel(ad, w, spatial)?;
    let strides = a.ints_len("strides", spatial, 1)?;
    let dilations = a.ints_len("dilations", spatial, 1)?;
    let pads = a.ints_len("pads", 2 * spatial, 0)?;
    let group = a.int("group", 1)?;
    // The forward output may be longer than what a Conv over it yields
    // back (output_padding); crop it so the Conv sees the right extent.
    let mut g = ad.dy(0)?;
    for i in 0..spatial {
        let back = (ys[2 + i] + pads[i] + pads[spatial + i] - dilations[i] * (k[i] - 1) - 1)
            / strides[i]
            + 1;
        if back != xs[2 + i] {
            return Err(ad.error(format!("cannot invert the geometry of spatial axis {i}")));
        }
    }
    g = ad.op(
        "Conv",
        &[&g, w],
        vec![
            attrs::ints("strides", &strides),
            attrs::ints("dilations", &dilations),
            attrs::ints("pads", &pads),
            attrs::ints("kernel_shape", &k),
            attrs::int("group", group),
        ],
    );
    ad.give(0, g);
    Ok(())
}
