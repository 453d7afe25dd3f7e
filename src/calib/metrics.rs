//! Detection metrics, computed exactly from sorted scores (no coarse
//! threshold sweep). In-distribution (ID) frames are the positives and higher
//! scores mean "more in-distribution", for every method.
//!
//! Ties matter: at T = 1 many ID frames have a max-softmax of exactly 1.0 in
//! float32, so every threshold is taken between distinct score values and
//! frames with equal scores always fall on the same side.

/// All the paper's metrics for one ID/OOD pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// False-positive rate (OOD kept) at the threshold that keeps `tpr` of ID.
    pub fpr_at_tpr: f64,
    /// The threshold δ used for `fpr_at_tpr`.
    pub threshold: f64,
    /// min over δ of ½(1 − TPR) + ½·FPR.
    pub detection_error: f64,
    /// Area under the ROC curve (ties count one half).
    pub auroc: f64,
    /// Area under precision-recall with ID as positive.
    pub aupr_in: f64,
    /// Area under precision-recall with OOD as positive (scores negated).
    pub aupr_out: f64,
}

/// The largest δ such that at least `tpr` of `id` scores are ≥ δ.
///
/// This is the calibration rule: "keep 95% of in-distribution frames".
pub fn threshold_at_tpr(id: &[f32], tpr: f64) -> f64 {
    let mut sorted: Vec<f64> = id.iter().map(|s| f64::from(*s)).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    if sorted.is_empty() {
        return f64::NEG_INFINITY;
    }
    let keep = ((tpr.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[keep - 1]
}

/// Fraction of `scores` that are ≥ `threshold`.
pub fn fraction_kept(scores: &[f32], threshold: f64) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores
        .iter()
        .filter(|s| f64::from(**s) >= threshold)
        .count() as f64
        / scores.len() as f64
}

/// Computes every metric for ID scores `id` and OOD scores `ood`, with the
/// FPR taken at true-positive rate `tpr` (0.95 in the paper).
pub fn evaluate(id: &[f32], ood: &[f32], tpr: f64) -> Metrics {
    let threshold = threshold_at_tpr(id, tpr);
    let roc = roc_points(id, ood);
    let detection_error = roc
        .iter()
        .map(|(fpr, tpr)| 0.5 * (1.0 - tpr) + 0.5 * fpr)
        .fold(f64::INFINITY, f64::min);
    let negated = |v: &[f32]| v.iter().map(|s| -s).collect::<Vec<f32>>();
    Metrics {
        fpr_at_tpr: fraction_kept(ood, threshold),
        threshold,
        detection_error,
        auroc: auroc(id, ood),
        aupr_in: average_precision(id, ood),
        aupr_out: average_precision(&negated(ood), &negated(id)),
    }
}

/// (score, is_positive) sorted by descending score.
fn ranked(positives: &[f32], negatives: &[f32]) -> Vec<(f64, bool)> {
    let mut all: Vec<(f64, bool)> = positives
        .iter()
        .map(|s| (f64::from(*s), true))
        .chain(negatives.iter().map(|s| (f64::from(*s), false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    all
}

/// Walks thresholds from +∞ down through each distinct score, yielding
/// cumulative (true positives, false positives) after each group of ties.
fn cumulative(positives: &[f32], negatives: &[f32]) -> Vec<(usize, usize)> {
    let all = ranked(positives, negatives);
    let mut out = vec![(0, 0)];
    let (mut tp, mut fp) = (0, 0);
    let mut i = 0;
    while i < all.len() {
        let value = all[i].0;
        while i < all.len() && all[i].0 == value {
            if all[i].1 {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        out.push((tp, fp));
    }
    out
}

/// The ROC curve as (FPR, TPR) points, from (0, 0) to (1, 1).
pub fn roc_points(id: &[f32], ood: &[f32]) -> Vec<(f64, f64)> {
    let (p, n) = (id.len().max(1) as f64, ood.len().max(1) as f64);
    cumulative(id, ood)
        .into_iter()
        .map(|(tp, fp)| (fp as f64 / n, tp as f64 / p))
        .collect()
}

/// AUROC: the probability that a random ID score exceeds a random OOD
/// score, ties counting one half (the trapezoid over the exact ROC).
pub fn auroc(id: &[f32], ood: &[f32]) -> f64 {
    let roc = roc_points(id, ood);
    roc.windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
        .sum()
}

/// Average precision with `positives` as the positive class: Σ ΔRecall ·
/// Precision over the distinct thresholds.
pub fn average_precision(positives: &[f32], negatives: &[f32]) -> f64 {
    if positives.is_empty() {
        return 0.0;
    }
    let p = positives.len() as f64;
    cumulative(positives, negatives)
        .windows(2)
        .map(|w| {
            let (tp, fp) = w[1];
            let recall_gain = (tp - w[0].0) as f64 / p;
            recall_gain * tp as f64 / (tp + fp) as f64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn perfect_separation() {
        let m = evaluate(&[0.9, 0.8, 0.7, 0.95], &[0.1, 0.2, 0.3], 0.95);
        assert!(close(m.auroc, 1.0) && close(m.fpr_at_tpr, 0.0) && close(m.detection_error, 0.0));
        assert!(close(m.aupr_in, 1.0) && close(m.aupr_out, 1.0));
        assert!(close(m.threshold, f64::from(0.7f32)));
    }

    #[test]
    fn all_equal_scores_cannot_separate() {
        let m = evaluate(&[0.5; 4], &[0.5; 6], 0.95);
        assert!(close(m.auroc, 0.5), "{}", m.auroc);
        assert!(close(m.fpr_at_tpr, 1.0));
        assert!(close(m.detection_error, 0.5));
        assert!(close(m.aupr_in, 0.4) && close(m.aupr_out, 0.6));
    }

    #[test]
    fn hand_computed_case_with_ties() {
        // ID: 3, 2, 2, 1   OOD: 2, 0
        // Pairs (4×2 = 8): ID>OOD: 3>2,3>0,2>0,2>0,1>0 = 5; ties 2=2 twice = 1; AUROC = 6/8.
        let (id, ood) = ([3.0f32, 2.0, 2.0, 1.0], [2.0f32, 0.0]);
        assert!(close(auroc(&id, &ood), 0.75));
        // ROC: (0,0) → (0,¼) → (½,¾) → (½,1) → (1,1)
        assert_eq!(
            roc_points(&id, &ood),
            vec![(0.0, 0.0), (0.0, 0.25), (0.5, 0.75), (0.5, 1.0), (1.0, 1.0)]
        );
        // TPR ≥ 95% of 4 → keep all 4 → δ = 1 → FPR = ½.
        let m = evaluate(&id, &ood, 0.95);
        assert!(close(m.threshold, 1.0) && close(m.fpr_at_tpr, 0.5));
        // Detection error: best at δ=3 (½·¾ + 0 = 0.375) or δ=1 (0 + ¼ = 0.25) → 0.25.
        assert!(close(m.detection_error, 0.25));
        // AP(ID): thresholds 3 → P=1, ΔR=¼; 2 → tp 3 fp 1, P=¾, ΔR=½; 1 → tp 4 fp 1, P=⅘, ΔR=¼.
        assert!(close(m.aupr_in, 0.25 + 0.375 + 0.2));
    }

    #[test]
    fn a_known_roc_area() {
        // Scores interleaved so exactly 3 of the 9 pairs are misordered: AUROC = 6/9.
        let (id, ood) = ([0.9f32, 0.5, 0.2], [0.6f32, 0.4, 0.1]);
        assert!(close(auroc(&id, &ood), 6.0 / 9.0));
    }

    #[test]
    fn threshold_keeps_the_requested_fraction() {
        let id: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert!(close(threshold_at_tpr(&id, 0.95), 6.0));
        assert!(close(fraction_kept(&id, 6.0), 0.95));
    }
}
