//! Pointwise activations. Each adjoint is dY times the derivative, built
//! from whichever of the node's input or output gives it cheapest; masks
//! are `Cast(Greater(..))` multiplied in, which ONNX Runtime runs several
//! times faster than `Where` against a broadcast scalar.

use super::{first, Adjoint, RuleTable};
use crate::grad::GradError;

/// Adds the activations.
pub fn register(t: &mut RuleTable) {
    t.register("Relu", first, relu);
    t.register("LeakyRelu", first, leaky_relu);
    t.register("PRelu", first, prelu);
    t.register("Clip", first, clip);
    t.register("Sigmoid", first, sigmoid);
    t.register("Tanh", first, tanh);
    t.register("HardSigmoid", first, hard_sigmoid);
    t.register("HardSwish", first, hard_swish);
    t.register("Softplus", first, softplus);
    t.register("Elu", first, elu);
    t.register("Erf", first, erf);
    t.register("Gelu", first, gelu);
    t.register("Softmax", first, softmax);
    t.register("LogSoftmax", first, log_softmax);
    t.register("Neg", first, neg);
    t.register("Exp", first, exp);
    t.register("Log", first, log);
    t.register("Sqrt", first, sqrt);
}

/// `Cast(op(a, b), to = dtype of a)`: a 0/1 mask in the gradient's dtype.
fn mask(ad: &mut Adjoint<'_>, op: &str, a: &str, b: &str, dt: i32) -> String {
    let m = ad.op(op, &[a, b], vec![]);
    ad.cast(&m, dt)
}

fn finish(ad: &mut Adjoint<'_>, derivative: &str) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    let dx = ad.op("Mul", &[&dy, derivative], vec![]);
    ad.give(0, dx);
    Ok(())
}

/// ReLU'(v) = [v > 0], read off the output (y > 0 ⇔ x > 0); ReLU'(0) = 0
/// as in PyTorch, which the reference gradients use.
fn relu(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    let dt = ad.dtype(y)?;
    let zero = ad.scalar(dt, 0.0);
    let m = mask(ad, "Greater", y, &zero, dt);
    finish(ad, &m)
}

/// 1 where x > 0, else α: mask·(1 − α) + α.
fn leaky_relu(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let alpha = f64::from(ad.attrs().float("alpha", 0.01)?);
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let zero = ad.scalar(dt, 0.0);
    let m = mask(ad, "Greater", x, &zero, dt);
    let k = ad.scalar(dt, 1.0 - alpha);
    let a = ad.scalar(dt, alpha);
    let mk = ad.op("Mul", &[&m, &k], vec![]);
    let d = ad.op("Add", &[&mk, &a], vec![]);
    finish(ad, &d)
}

/// 1 where x > 0, else the (broadcast) slope: mask + (1 − mask)·slope.
fn prelu(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (x, slope) = (ad.input(0)?, ad.input(1)?);
    let dt = ad.dtype(x)?;
    let zero = ad.scalar(dt, 0.0);
    let one = ad.scalar(dt, 1.0);
    let m = mask(ad, "Greater", x, &zero, dt);
    let inv = ad.op("Sub", &[&one, &m], vec![]);
    let s = ad.op("Mul", &[&inv, slope], vec![]);
    let d = ad.op("Add", &[&m, &s], vec![]);
    finish(ad, &d)
}

/// 1 where min ≤ x ≤ max (PyTorch's clamp convention at the bounds).
fn clip(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let mut d: Option<String> = None;
    for (i, op) in [(1, "GreaterOrEqual"), (2, "LessOrEqual")] {
        if ad.has_input(i) {
            let bound = ad.input(i)?;
            let m = mask(ad, op, x, bound, dt);
            d = Some(match d {
                None => m,
                Some(prev) => ad.op("Mul", &[&prev, &m], vec![]),
            });
        }
    }
    match d {
        Some(d) => finish(ad, &d),
        None => {
            let dy = ad.dy(0)?;
            ad.give(0, dy);
            Ok(())
        }
    }
}

/// σ' = y(1 − y).
fn sigmoid(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    let one = ad.scalar(ad.dtype(y)?, 1.0);
    let c = ad.op("Sub", &[&one, y], vec![]);
    let d = ad.op("Mul", &[y, &c], vec![]);
    finish(ad, &d)
}

/// tanh' = 1 − y².
fn tanh(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    let one = ad.scalar(ad.dtype(y)?, 1.0);
    let y2 = ad.op("Mul", &[y, y], vec![]);
    let d = ad.op("Sub", &[&one, &y2], vec![]);
    finish(ad, &d)
}

/// y = clamp(αx + β, 0, 1): α strictly inside the ramp, 0 on the flats.
fn hard_sigmoid(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let alpha = f64::from(ad.attrs().float("alpha", 0.2)?);
    let y = ad.output(0)?;
    let dt = ad.dtype(y)?;
    let zero = ad.scalar(dt, 0.0);
    let one = ad.scalar(dt, 1.0);
    let lo = mask(ad, "Greater", y, &zero, dt);
    let hi = mask(ad, "Less", y, &one, dt);
    let a = ad.scalar(dt, alpha);
    let m = ad.op("Mul", &[&lo, &hi], vec![]);
    let d = ad.op("Mul", &[&m, &a], vec![]);
    finish(ad, &d)
}

/// y = x·clamp(x/6 + 1/2, 0, 1): 0 below −3, 1 above 3, x/3 + 1/2 between.
fn hard_swish(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let (m3, p3, third, half, one) = (
        ad.scalar(dt, -3.0),
        ad.scalar(dt, 3.0),
        ad.scalar(dt, 1.0 / 3.0),
        ad.scalar(dt, 0.5),
        ad.scalar(dt, 1.0),
    );
    let lo = mask(ad, "Greater", x, &m3, dt);
    let hi = mask(ad, "Less", x, &p3, dt);
    let xt = ad.op("Mul", &[x, &third], vec![]);
    let inner = ad.op("Add", &[&xt, &half], vec![]);
    let im1 = ad.op("Sub", &[&inner, &one], vec![]);
    let h = ad.op("Mul", &[&hi, &im1], vec![]);
    let h1 = ad.op("Add", &[&h, &one], vec![]);
    let d = ad.op("Mul", &[&lo, &h1], vec![]);
    finish(ad, &d)
}

/// softplus' = σ(x).
fn softplus(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let d = ad.op("Sigmoid", &[x], vec![]);
    finish(ad, &d)
}

/// 1 where x > 0, else y + α (= α·eˣ).
fn elu(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let alpha = f64::from(ad.attrs().float("alpha", 1.0)?);
    let (x, y) = (ad.input(0)?, ad.output(0)?);
    let dt = ad.dtype(x)?;
    let zero = ad.scalar(dt, 0.0);
    let one = ad.scalar(dt, 1.0);
    let a = ad.scalar(dt, alpha);
    let m = mask(ad, "Greater", x, &zero, dt);
    let inv = ad.op("Sub", &[&one, &m], vec![]);
    let ya = ad.op("Add", &[y, &a], vec![]);
    let neg = ad.op("Mul", &[&inv, &ya], vec![]);
    let d = ad.op("Add", &[&m, &neg], vec![]);
    finish(ad, &d)
}

/// erf'(x) = 2/√π · e^(−x²).
fn erf(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let c = ad.scalar(dt, 2.0 / std::f64::consts::PI.sqrt());
    let x2 = ad.op("Mul", &[x, x], vec![]);
    let n = ad.op("Neg", &[&x2], vec![]);
    let e = ad.op("Exp", &[&n], vec![]);
    let d = ad.op("Mul", &[&e, &c], vec![]);
    finish(ad, &d)
}

/// Exact GELU (opset 20): Φ(x) + x·φ(x). The tanh approximation is a
/// different function and is not covered.
fn gelu(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let approx = ad.attrs().string("approximate", "none")?;
    if approx != "none" {
        return Err(ad.attrs().error(
            "approximate",
            format!("{approx:?} is not covered, only \"none\""),
        ));
    }
    let x = ad.input(0)?;
    let dt = ad.dtype(x)?;
    let (r2, half, one, c) = (
        ad.scalar(dt, std::f64::consts::FRAC_1_SQRT_2),
        ad.scalar(dt, 0.5),
        ad.scalar(dt, 1.0),
        ad.scalar(dt, 1.0 / (2.0 * std::f64::consts::PI).sqrt()),
    );
    let xs = ad.op("Mul", &[x, &r2], vec![]);
    let er = ad.op("Erf", &[&xs], vec![]);
    let e1 = ad.op("Add", &[&er, &one], vec![]);
    let cdf = ad.op("Mul", &[&e1, &half], vec![]);
    let x2 = ad.op("Mul", &[x, x], vec![]);
    let hx2 = ad.op("Mul", &[&x2, &half], vec![]);
    let n = ad.op("Neg", &[&hx2], vec![]);
    let e = ad.op("Exp", &[&n], vec![]);
    let pdf = ad.op("Mul", &[&e, &c], vec![]);
    let xpdf = ad.op("Mul", &[x, &pdf], vec![]);
    let d = ad.op("Add", &[&cdf, &xpdf], vec![]);
    finish(ad, &d)
}

/// The (single, opset ≥ 13) axis of a Softmax/LogSoftmax, non-negative.
fn softmax_axis(ad: &Adjoint<'_>) -> Result<i64, GradError> {
    let rank = ad.shape(ad.input(0)?)?.len() as i64;
    let axis = ad.attrs().int("axis", -1)?;
    Ok(if axis < 0 { axis + rank } else { axis })
}

/// dX = y ⊙ (dY − Σ_axis dY ⊙ y): softmax's Jacobian applied without
/// forming it. (A trailing Softmax is skipped before the pass; this is
/// for one inside the network, as in attention.)
fn softmax(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let axis = softmax_axis(ad)?;
    let y = ad.output(0)?;
    let dy = ad.dy(0)?;
    let p = ad.op("Mul", &[&dy, y], vec![]);
    let ax = ad.ints(&[axis]);
    let s = ad.op(
        "ReduceSum",
        &[&p, &ax],
        vec![crate::grad::attrs::int("keepdims", 1)],
    );
    let d = ad.op("Sub", &[&dy, &s], vec![]);
    let dx = ad.op("Mul", &[y, &d], vec![]);
    ad.give(0, dx);
    Ok(())
}

/// dX = dY − exp(y) ⊙ Σ_axis dY.
fn log_softmax(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let axis = softmax_axis(ad)?;
    let y = ad.output(0)?;
    let dy = ad.dy(0)?;
    let ax = ad.ints(&[axis]);
    let s = ad.op(
        "ReduceSum",
        &[&dy, &ax],
        vec![crate::grad::attrs::int("keepdims", 1)],
    );
    let e = ad.op("Exp", &[y], vec![]);
    let es = ad.op("Mul", &[&e, &s], vec![]);
    let dx = ad.op("Sub", &[&dy, &es], vec![]);
    ad.give(0, dx);
    Ok(())
}

fn neg(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    let dx = ad.op("Neg", &[&dy], vec![]);
    ad.give(0, dx);
    Ok(())
}

/// exp' = y.
fn exp(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    finish(ad, y)
}

/// log' = 1/x.
fn log(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let x = ad.input(0)?;
    let dy = ad.dy(0)?;
    let dx = ad.op("Div", &[&dy, x], vec![]);
    ad.give(0, dx);
    Ok(())
}

/// sqrt' = 1/(2y).
fn sqrt(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let y = ad.output(0)?;
    let half = ad.scalar(ad.dtype(y)?, 0.5);
    let dy = ad.dy(0)?;
    let h = ad.op("Mul", &[&dy, &half], vec![]);
    let dx = ad.op("Div", &[&h, y], vec![]);
    ad.give(0, dx);
    Ok(())
}
