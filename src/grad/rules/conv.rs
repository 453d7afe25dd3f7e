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
    let dx = ad.spread(&dy, w, group, &geo, vec![])?;
    ad.give(0, dx);
    Ok(())
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
