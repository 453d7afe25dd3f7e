//! Normalisation: BatchNormalization in inference form, an affine map per
//! channel whose adjoint is a per-channel scale.

use super::{first, Adjoint, RuleTable};
use crate::grad::GradError;

/// Adds BatchNormalization.
pub fn register(t: &mut RuleTable) {
    t.register("BatchNormalization", first, batch_norm);
}

/// y = scale·(x − mean)/√(var + ε) + B, so dX = dY·scale/√(var + ε),
/// broadcast along the channel axis.
fn batch_norm(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let a = ad.attrs();
    if a.int("training_mode", 0)? != 0 || ad.node.output.iter().skip(1).any(|o| !o.is_empty()) {
        return Err(ad.error("training-mode BatchNormalization (batch statistics) is not covered"));
    }
    let eps = a.float("epsilon", 1e-5)?;
    let (x, scale, var) = (ad.input(0)?, ad.input(1)?, ad.input(4)?);
    let rank = ad.shape(x)?.len() as i64;
    let dt = ad.dtype(x)?;
    let e = ad.scalar(dt, f64::from(eps));
    let ve = ad.op("Add", &[var, &e], vec![]);
    let sd = ad.op("Sqrt", &[&ve], vec![]);
    let f = ad.op("Div", &[scale, &sd], vec![]);
    let axes = ad.ints(&(1..rank - 1).collect::<Vec<_>>());
    let f = if rank > 2 {
        ad.op("Unsqueeze", &[&f, &axes], vec![])
    } else {
        f
    };
    let dy = ad.dy(0)?;
    let dx = ad.op("Mul", &[&dy, &f], vec![]);
    ad.give(0, dx);
    Ok(())
}
