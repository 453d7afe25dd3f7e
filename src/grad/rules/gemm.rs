//! Matrix products: Gemm (transA, transB, alpha, beta) and batched,
//! broadcasting MatMul.

use super::{all, Adjoint, RuleTable};
use crate::grad::{attrs, GradError};

/// Adds Gemm and MatMul.
pub fn register(t: &mut RuleTable) {
    t.register("Gemm", all, gemm);
    t.register("MatMul", all, matmul);
}

/// Y = α·op(A)·op(B) + β·C.
fn gemm(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let a_attr = ad.attrs();
    let alpha = a_attr.float("alpha", 1.0)?;
    let beta = a_attr.float("beta", 1.0)?;
    let ta = a_attr.int("transA", 0)? != 0;
    let tb = a_attr.int("transB", 0)? != 0;
    let (a, b, y) = (ad.input(0)?, ad.input(1)?, ad.output(0)?);
    let dy = ad.dy(0)?;
    let gemm_attrs = |ta: bool, tb: bool| {
        vec![
            attrs::float("alpha", alpha),
            attrs::int("transA", i64::from(ta)),
            attrs::int("transB", i64::from(tb)),
        ]
    };
    if ad.wants(0) {
        // dA = α·dY·op(B)ᵀ, or its transpose when A was transposed.
        let da = if !ta && tb && alpha == 1.0 {
            // The common classifier head: a MatMul against the stored
            // weight runs faster than a Gemm with a transpose flag.
            ad.op("MatMul", &[&dy, b], vec![])
        } else if !ta {
            ad.op("Gemm", &[&dy, b], gemm_attrs(false, !tb))
        } else {
            ad.op("Gemm", &[b, &dy], gemm_attrs(tb, true))
        };
        ad.give(0, da);
    }
    if ad.wants(1) {
        let db = if !tb {
            ad.op("Gemm", &[a, &dy], gemm_attrs(!ta, false))
        } else {
            ad.op("Gemm", &[&dy, a], gemm_attrs(true, ta))
        };
        ad.give(1, db);
    }
    if ad.wants(2) {
        let c = ad.input(2)?;
        let b_ = ad.scalar(ad.dtype(y)?, f64::from(beta));
        let scaled = ad.op("Mul", &[&dy, &b_], vec![]);
        let dc = ad.unbroadcast(&scaled, y, c)?;
        ad.give(2, dc);
    }
    Ok(())
}

/// Transposes the last two axes of a rank-`r` tensor.
fn swap_last(ad: &mut Adjoint<'_>, t: &str, r: usize) -> String {
    let mut perm: Vec<i64> = (0..r as i64).collect();
    perm.swap(r - 2, r - 1);
    ad.op("Transpose", &[t], vec![attrs::ints("perm", &perm)])
}

/// Y = A·B with numpy broadcasting over the leading axes; dA = dY·Bᵀ and
/// dB = Aᵀ·dY, each summed back over the axes its operand was broadcast on.
fn matmul(ad: &mut Adjoint<'_>) -> Result<(), GradError> {
    let (a, b, y) = (ad.input(0)?, ad.input(1)?, ad.output(0)?);
    let (ra, rb) = (ad.shape(a)?.len(), ad.shape(b)?.len());
    if ra < 2 || rb < 2 {
        return Err(ad.error("MatMul with a 1-D operand is not covered"));
    }
    let dy = ad.dy(0)?;
    if ad.wants(0) {
        let bt = swap_last(ad, b, rb);
        let full = ad.op("MatMul", &[&dy, &bt], vec![]);
        let da = unbroadcast_matmul(ad, &full, a, y)?;
        ad.give(0, da);
    }
    if ad.wants(1) {
        let at = swap_last(ad, a, ra);
        let full = ad.op("MatMul", &[&at, &dy], vec![]);
        let db = unbroadcast_matmul(ad, &full, b, y)?;
        ad.give(1, db);
    }
    Ok(())
}

/// Sums a full-batch operand gradient back over the batch axes the operand
/// was broadcast along (its own two matrix axes are already right).
fn unbroadcast_matmul(
    ad: &mut Adjoint<'_>,
    g: &str,
    target: &str,
    y: &str,
) -> Result<String, GradError> {
    let ys = ad.shape(y)?.to_vec();
    let ts = ad.shape(target)?.to_vec();
    let lead = ys.len() - ts.len();
    let mut axes: Vec<i64> = (0..lead as i64).collect();
    for i in 0..ts.len().saturating_sub(2) {
        if ts[i] == 1 && ys[lead + i] != 1 {
            axes.push((lead + i) as i64);
        }
    }
    if axes.is_empty() {
        return Ok(g.to_string());
    }
    let ax = ad.ints(&axes);
    let s = ad.op("ReduceSum", &[g, &ax], vec![attrs::int("keepdims", 1)]);
    Ok(ad.reshape_like(&s, target))
}
