//! Reductions: ReduceSum and ReduceMean broadcast dY back over the reduced
//! axes (ReduceMean also divides by how many elements were averaged).

use super::{first, Adjoint, RuleTable};
use crate::grad::GradError;

/// Adds ReduceSum and ReduceMean.
pub fn register(t: &mut RuleTable) {
    t.register("ReduceSum", first, reduce_sum);
    t.register("ReduceMean", first, reduce_mean);
}

fn reduce_sum(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    reduce(ad, false)
}

fn reduce_mean(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    reduce(ad, true)
}

fn reduce(ad: &mut Adjoint<'_>, mean: bool) -> Result<(), GradError> {
    let (x, y) = (ad.input(0)?, ad.output(0)?);
    let rank = ad.shape(x)?.len() as i64;
    let a = ad.attrs();
    // Axes moved from attribute to input in opset 13 (ReduceSum) and 18
    // (ReduceMean).
    let axes_as_input = if mean { ad.opset >= 18 } else { ad.opset >= 13 };
    let axes = if axes_as_input {
        ad.opt_const_ints(1)?
    } else {
        a.ints("axes")?
    };
    let keepdims = a.int("keepdims", 1)? != 0;
    let noop = a.int("noop_with_empty_axes", 0)? != 0;
    let dy = ad.dy(0)?;
    let mut axes: Vec<i64> = match axes {
        Some(v) if !v.is_empty() => v
            .iter()
            .map(|&v| if v < 0 { v + rank } else { v })
            .collect(),
        _ if noop => {
            ad.give(0, dy);
            return Ok(());
        }
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    let g = if keepdims {
        dy
    } else {
        let ax = ad.ints(&axes);
        ad.op("Unsqueeze", &[&dy, &ax], vec![])
    };
    let g = if mean {
        let dt = ad.dtype(x)?;
        if axes.contains(&0) {
            // The batch axis is averaged: the count is known only at run time.
            let (sx, sy) = (ad.op("Size", &[x], vec![]), ad.op("Size", &[y], vec![]));
            let (cx, cy) = (ad.cast(&sx, dt), ad.cast(&sy, dt));
            let r = ad.op("Div", &[&cy, &cx], vec![]);
            ad.op("Mul", &[&g, &r], vec![])
        } else {
            let xs = ad.shape(x)?;
            let n: i64 = axes.iter().map(|&a| xs[a as usize]).product();
            let s = ad.scalar(dt, 1.0 / n as f64);
            ad.op("Mul", &[&g, &s], vec![])
        }
    } else {
        g
    };
    let shape = ad.op("Shape", &[x], vec![]);
    let dx = ad.op("Expand", &[&g, &shape], vec![]);
    ad.give(0, dx);
    Ok(())
}
