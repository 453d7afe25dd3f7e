//! Arithmetic (Add, Sub, Mul, Div, variadic Sum) with numpy broadcasting: each operand's gradient is
//! summed back over the axes along which it was broadcast.

use super::{all, Adjoint, RuleTable};
use crate::grad::GradError;

/// Adds Add, Sub, Mul, Div.
pub fn register(t: &mut RuleTable) {
    t.register("Add", all, add);
    t.register("Sub", all, sub);
    t.register("Mul", all, mul);
    t.register("Div", all, div);
    t.register("Sum", all, sum);
}

/// Variadic Sum with broadcasting: each operand gets dY summed to its shape.
fn sum(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    for i in 0..ad.node.input.len() {
        if ad.wants(i) {
            hand_back(ad, i, &dy)?;
        }
    }
    Ok(())
}

fn hand_back(ad: &mut Adjoint<'_>, i: usize, g: &str) -> Result<(), GradError> {
    let (t, y) = (ad.input(i)?, ad.output(0)?);
    let r = ad.unbroadcast(g, y, t)?;
    ad.give(i, r);
    Ok(())
}

fn add(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    for i in 0..2 {
        if ad.wants(i) {
            hand_back(ad, i, &dy)?;
        }
    }
    Ok(())
}

fn sub(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    if ad.wants(0) {
        hand_back(ad, 0, &dy)?;
    }
    if ad.wants(1) {
        let n = ad.op("Neg", &[&dy], vec![]);
        hand_back(ad, 1, &n)?;
    }
    Ok(())
}

fn mul(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    for (i, other) in [(0, 1), (1, 0)] {
        if ad.wants(i) {
            let o = ad.input(other)?;
            let g = ad.op("Mul", &[&dy, o], vec![]);
            hand_back(ad, i, &g)?;
        }
    }
    Ok(())
}

/// d(a/b)/da = 1/b; d(a/b)/db = −(a/b)/b.
fn div(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let dy = ad.dy(0)?;
    let (b, y) = (ad.input(1)?, ad.output(0)?);
    if ad.wants(0) {
        let g = ad.op("Div", &[&dy, b], vec![]);
        hand_back(ad, 0, &g)?;
    }
    if ad.wants(1) {
        let yb = ad.op("Div", &[y, b], vec![]);
        let p = ad.op("Mul", &[&dy, &yb], vec![]);
        let g = ad.op("Neg", &[&p], vec![]);
        hand_back(ad, 1, &g)?;
    }
    Ok(())
}
