//! Deep nearest neighbours (Sun et al., ICML 2022), as OpenOOD's
//! `knn_postprocessor.py`.

use ndarray::linalg::{general_mat_mul, general_mat_vec_mul};
use std::sync::Arc;

use ndarray::{ArrayView2, ArrayViewMut2};

use super::{Detector, DetectorError, FeatureBatch};
use crate::fit::stats::Stats;

/// KNN: the negated **squared** L2 distance from the L2-normalised feature to
/// its k-th nearest neighbour in a bank of L2-normalised training features.
///
/// `score(h) = −‖ĥ − b̂_(k)‖²` with `ĥ = h/‖h‖`, `b̂_(k)` the k-th closest bank
/// row. OpenOOD v1.5 `knn_postprocessor.py`: `normalizer` (l. 11), a faiss
/// `IndexFlatL2` over the normalised training features (l. 40–41; faiss's
/// L2 index returns *squared* distances), `kth_dist = -D[:, -1]` (l. 50–54).
/// Default k = 50 (`configs/postprocessors/knn.yml`). Two deliberate
/// differences, both at rounding level: OpenOOD's normaliser adds 1e-10 to
/// every component after dividing, and an all-zero feature (0/0 there) is
/// left at zero here (distance² = 1 to every unit bank row).
///
/// Search is exact brute force, single-threaded, in safe code: the bank is
/// scanned in blocks of [`BLOCK_ROWS`] rows, and for each block one f32 GEMM
/// (`ndarray`/`matrixmultiply`, which picks AVX2/FMA at run time inside
/// the dependency) computes the dot products of the whole batch of queries
/// with the block, from which the keys `q·b − ‖b‖²/2` follow. Per query it
/// keeps every row whose f32 key is within a proven rounding margin of the
/// running k-th best; those few candidates are then re-scored exactly in
/// `f64` and the k-th smallest squared distance taken. The result is the
/// exact k-th distance (f64, against the stored f32 bank) whatever the
/// kernel, block or batch size: deterministic across CPUs.
#[derive(Debug, Clone)]
pub struct Knn {
    bank: Arc<KnnBank>,
    k: usize,
}

/// A bank of L2-normalised training features prepared for the search;
/// shared by every [`Knn`] over it (whatever their k).
#[derive(Debug, Clone)]
pub struct KnnBank {
    d: usize,
    rows: usize,
    /// The bank, `rows × d` row-major.
    bank: Vec<f32>,
    /// `‖b‖²/2` per row.
    half_norm2: Vec<f32>,
    max_norm: f64,
}

/// Below this many queries the search uses matrix–vector products.
const SMALL_BATCH: usize = 4;

/// Bank rows per GEMM: a batch of 32 queries gets a 32 × 2048 block of dot
/// products (256 KiB), which stays in L2 while the candidates are offered.
pub const BLOCK_ROWS: usize = 2048;

impl KnnBank {
    /// The bank of fitted statistics.
    pub fn new(stats: &Stats) -> Result<Self, DetectorError> {
        if stats.bank_rows() == 0 {
            return Err(DetectorError::Missing(
                "KNN bank (fitted with --bank-rows 0)".into(),
            ));
        }
        Self::from_bank(&stats.knn_bank, stats.dim())
    }

    /// A row-major bank of `bank.len() / dim` rows, which should already be
    /// L2-normalised (as the fitter stores them).
    pub fn from_bank(bank: &[f32], dim: usize) -> Result<Self, DetectorError> {
        if dim == 0 || bank.is_empty() || !bank.len().is_multiple_of(dim) {
            return Err(DetectorError::Param {
                name: "dim",
                value: dim.to_string(),
                reason: format!(
                    "bank has {} values, not a positive multiple of it",
                    bank.len()
                ),
            });
        }
        let rows = bank.len() / dim;
        if rows > u32::MAX as usize {
            return Err(DetectorError::Param {
                name: "bank",
                value: rows.to_string(),
                reason: "more than 2³² rows".into(),
            });
        }
        if let Some(i) = bank.iter().position(|v| !v.is_finite()) {
            return Err(DetectorError::Param {
                name: "bank",
                value: format!("{}", bank[i]),
                reason: format!("non-finite value at {i}"),
            });
        }
        let mut half_norm2 = Vec::with_capacity(rows);
        let mut max_norm = 0.0f64;
        for row in bank.chunks_exact(dim) {
            let n2: f64 = row.iter().map(|v| f64::from(*v).powi(2)).sum();
            half_norm2.push((0.5 * n2) as f32);
            max_norm = max_norm.max(n2.sqrt());
        }
        Ok(Self {
            d: dim,
            rows,
            bank: bank.to_vec(),
            half_norm2,
            max_norm,
        })
    }

    /// Rows in the bank.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// For each of the `n` feature rows in `features` (`n × d`), the exact
    /// squared distances from its normalised feature to its `k_max` nearest
    /// bank rows, ascending (`None` for a non-finite feature). One search
    /// answers every k ≤ `k_max`.
    pub fn nearest(
        &self,
        features: &[f32],
        n: usize,
        k_max: usize,
    ) -> Result<Vec<Option<Vec<f64>>>, DetectorError> {
        let d = self.d;
        if features.len() != n * d {
            return Err(DetectorError::Shape {
                what: "features",
                expected: n * d,
                found: features.len(),
            });
        }
        if k_max == 0 || k_max > self.rows {
            return Err(DetectorError::Param {
                name: "k",
                value: k_max.to_string(),
                reason: format!("must be in 1..={} (bank rows)", self.rows),
            });
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        // Bound on |f32 key − exact key| for a unit query: the f32 dot
        // product of D terms (≤ D·u·‖q‖‖b‖, any summation order, with or
        // without FMA), the f32 rounding of the query (u‖q‖‖b‖) and of
        // ‖b‖²/2 and the final subtraction (≤ 2u·max(1, ‖b‖²)); doubled for
        // slack. u = 2⁻²⁴.
        let scale = self.max_norm.max(1.0);
        let u = f64::from(f32::EPSILON) / 2.0;
        let eps = 2.0 * (d as f64 + 4.0) * u * scale * scale;
        let margin = (2.0 * eps) as f32;
        // Normalise the queries (f64, then an f32 copy for the GEMM).
        let mut q64 = vec![0.0f64; n * d];
        let mut q32 = vec![0.0f32; n * d];
        let mut valid = vec![true; n];
        for i in 0..n {
            let h = &features[i * d..(i + 1) * d];
            let norm = h.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            if !norm.is_finite() {
                valid[i] = false;
                continue;
            }
            let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            for j in 0..d {
                let v = f64::from(h[j]) * inv;
                q64[i * d + j] = v;
                q32[i * d + j] = v as f32;
            }
        }
        let mut cands: Vec<Candidates> = (0..n).map(|_| Candidates::new(k_max, margin)).collect();
        let q = ArrayView2::from_shape((n, d), &q32[..])
            .map_err(|e| DetectorError::Internal(e.to_string()))?;
        let mut dots = vec![0.0f32; n * BLOCK_ROWS.min(self.rows)];
        for start in (0..self.rows).step_by(BLOCK_ROWS) {
            let r = BLOCK_ROWS.min(self.rows - start);
            let block = ArrayView2::from_shape((r, d), &self.bank[start * d..(start + r) * d])
                .map_err(|e| DetectorError::Internal(e.to_string()))?;
            let mut c = ArrayViewMut2::from_shape((n, r), &mut dots[..n * r])
                .map_err(|e| DetectorError::Internal(e.to_string()))?;
            if n < SMALL_BATCH {
                // A GEMM packs the block for every call, which a few
                // queries cannot repay: row-by-row dot products instead
                // (ndarray's unrolled, vectorised dot).
                for (i, mut row) in c.outer_iter_mut().enumerate() {
                    general_mat_vec_mul(1.0, &block, &q.row(i), 0.0, &mut row);
                }
            } else {
                general_mat_mul(1.0, &q, &block.t(), 0.0, &mut c);
            }
            let half = &self.half_norm2[start..start + r];
            for (cand, row) in cands.iter_mut().zip(dots[..n * r].chunks_exact(r)) {
                cand.offer(row, half, start);
            }
        }
        Ok(cands
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                valid[i].then(|| c.exact_nearest(&q64[i * d..(i + 1) * d], &self.bank, d))
            })
            .collect())
    }
}

impl Knn {
    /// KNN over the statistics' bank with `k` neighbours (OpenOOD: 50).
    pub fn new(stats: &Stats, k: usize) -> Result<Self, DetectorError> {
        Self::with_bank(Arc::new(KnnBank::new(stats)?), k)
    }

    /// KNN over a row-major bank of `bank.len() / dim` rows, which should
    /// already be L2-normalised (as the fitter stores them).
    pub fn from_bank(bank: &[f32], dim: usize, k: usize) -> Result<Self, DetectorError> {
        Self::with_bank(Arc::new(KnnBank::from_bank(bank, dim)?), k)
    }

    /// KNN with `k` neighbours over a prepared bank.
    pub fn with_bank(bank: Arc<KnnBank>, k: usize) -> Result<Self, DetectorError> {
        if k == 0 || k > bank.rows {
            return Err(DetectorError::Param {
                name: "k",
                value: k.to_string(),
                reason: format!("must be in 1..={} (bank rows)", bank.rows),
            });
        }
        Ok(Self { bank, k })
    }

    /// Number of neighbours.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Rows in the bank.
    pub fn bank_rows(&self) -> usize {
        self.bank.rows
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.bank.d
    }
}

impl Detector for Knn {
    fn name(&self) -> &'static str {
        "knn"
    }

    fn tag(&self) -> String {
        format!("knn(k={})", self.k)
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        batch.check(out, None, Some(self.bank.d))?;
        let nearest = self.bank.nearest(batch.features, batch.n, self.k)?;
        for (o, dist) in out.iter_mut().zip(nearest) {
            *o = match dist {
                Some(dist) => (-dist[self.k - 1]) as f32,
                None => f32::NAN,
            };
        }
        Ok(())
    }
}

/// Running candidates of one query: every bank row whose approximate key is
/// at least `tau`, where `tau` trails the approximate k-th best key seen so
/// far by the margin. A row below `tau` cannot be among the exact k nearest:
/// if ε bounds each key's error, the approximate k-th best κ̂ is at most the
/// exact k-th best κ plus ε, and each exact top-k row has an approximate key
/// ≥ κ − ε ≥ κ̂ − 2ε (and κ̂ only grows as rows arrive).
struct Candidates {
    k: usize,
    margin: f32,
    tau: f32,
    cap: usize,
    items: Vec<(f32, u32)>,
}

impl Candidates {
    fn new(k: usize, margin: f32) -> Self {
        let cap = (4 * k).max(256);
        Self {
            k,
            margin,
            tau: f32::NEG_INFINITY,
            cap,
            items: Vec::with_capacity(cap + BLOCK_ROWS),
        }
    }

    #[inline(always)]
    fn offer(&mut self, dots: &[f32], half_norm2: &[f32], base: usize) {
        let tau = self.tau;
        for (j, (s, h)) in dots.iter().zip(half_norm2).enumerate() {
            let key = s - h;
            if key >= tau {
                self.items.push((key, (base + j) as u32));
            }
        }
        if self.items.len() > self.cap {
            self.prune();
            if self.items.len() > self.cap / 2 {
                // Many rows within the margin (duplicates): grow instead of
                // pruning again at every panel.
                self.cap *= 2;
            }
        }
    }

    fn prune(&mut self) {
        if self.items.len() < self.k {
            return;
        }
        let (_, kth, _) = self
            .items
            .select_nth_unstable_by(self.k - 1, |a, b| b.0.total_cmp(&a.0));
        self.tau = kth.0 - self.margin;
        let tau = self.tau;
        self.items.retain(|c| c.0 >= tau);
    }

    /// The exact `k` smallest squared distances from `q` (f64, unit) among
    /// the candidates, ascending, against the row-major `bank` of
    /// dimension `d`.
    fn exact_nearest(&mut self, q: &[f64], bank: &[f32], d: usize) -> Vec<f64> {
        self.prune();
        let mut dist: Vec<f64> = self
            .items
            .iter()
            .map(|&(_, idx)| {
                let row = &bank[idx as usize * d..(idx as usize + 1) * d];
                q.iter()
                    .zip(row)
                    .map(|(q, b)| {
                        let t = q - f64::from(*b);
                        t * t
                    })
                    .sum()
            })
            .collect();
        // `items` holds at least k rows: every row is offered while fewer than
        // k are held (tau stays −∞ until the first prune with ≥ k rows).
        dist.sort_unstable_by(f64::total_cmp);
        dist.truncate(self.k);
        dist
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::rng::SplitMix64;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn kth_distance_hand_checked() {
        // Bank on the unit circle at 0°, 90°, 180°, 270°.
        let bank = vec![1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0];
        // Query (3, 0) normalises to (1, 0): squared distances 0, 2, 4, 2.
        let q = [3.0f32, 0.0];
        let mut out = [0.0f32];
        for (k, want) in [(1, 0.0f32), (2, 2.0), (3, 2.0), (4, 4.0)] {
            let knn = Knn::from_bank(&bank, 2, k).unwrap();
            knn.score_batch(
                FeatureBatch {
                    logits: &[],
                    features: &q,
                    n: 1,
                },
                &mut out,
            )
            .unwrap();
            assert_eq!(out[0], -want, "k = {k}");
        }
        // Query at 45°: distances² to (1,0) and (0,1) are 2 − √2; others 2 + √2.
        let q = [1.0f32, 1.0];
        let knn = Knn::from_bank(&bank, 2, 2).unwrap();
        knn.score_batch(
            FeatureBatch {
                logits: &[],
                features: &q,
                n: 1,
            },
            &mut out,
        )
        .unwrap();
        assert!(
            (f64::from(out[0]) + (2.0 - 2f64.sqrt())).abs() < 1e-7,
            "{}",
            out[0]
        );
        // A zero feature is at distance² 1 from every unit row; NaN gives NaN.
        let q = [0.0f32, 0.0, f32::NAN, 1.0];
        let mut out2 = [0.0f32; 2];
        knn.score_batch(
            FeatureBatch {
                logits: &[],
                features: &q,
                n: 2,
            },
            &mut out2,
        )
        .unwrap();
        assert_eq!(out2[0], -1.0);
        assert!(out2[1].is_nan());
    }

    #[test]
    fn parameters_are_checked() {
        let bank = vec![1.0f32, 0.0];
        assert!(Knn::from_bank(&bank, 2, 2).is_err());
        assert!(Knn::from_bank(&bank, 2, 0).is_err());
        assert!(Knn::from_bank(&bank, 3, 1).is_err());
        let knn = Knn::from_bank(&bank, 2, 1).unwrap();
        let e = knn
            .score_batch(
                FeatureBatch {
                    logits: &[],
                    features: &[1.0],
                    n: 1,
                },
                &mut [0.0],
            )
            .unwrap_err();
        assert!(matches!(
            e,
            DetectorError::Shape {
                what: "features",
                ..
            }
        ));
    }

    /// Against a brute-force f64 sort, on a bank with many near-ties and
    /// duplicates (the candidate margin must keep them), in several blocks.
    #[test]
    fn matches_brute_force_with_ties_and_blocks() {
        let (d, rows) = (16, 5000);
        let mut rng = SplitMix64::new(3);
        let mut bank = Vec::with_capacity(rows * d);
        let base: Vec<f32> = (0..d).map(|_| rng.next_f64() as f32 - 0.5).collect();
        for r in 0..rows {
            let row: Vec<f32> = if r % 3 == 0 {
                base.clone() // exact duplicates
            } else {
                base.iter()
                    .map(|v| v + 1e-3 * (rng.next_f64() as f32 - 0.5))
                    .collect()
            };
            bank.extend(unit(&row));
        }
        let queries: Vec<f32> = (0..7 * d)
            .map(|i| {
                base[i % d]
                    + if i < d {
                        0.0
                    } else {
                        0.01 * (rng.next_f64() as f32 - 0.5)
                    }
            })
            .collect();
        for k in [1, 50, 1700, rows] {
            let knn = Knn::from_bank(&bank, d, k).unwrap();
            let mut got = vec![0.0f32; 7];
            let batch = FeatureBatch {
                logits: &[],
                features: &queries,
                n: 7,
            };
            knn.score_batch(batch, &mut got).unwrap();
            // One query at a time gives the same (the GEMM's summation
            // order may differ; the f64 re-scoring makes it exact).
            for i in 0..7 {
                let mut one = [0.0f32];
                let b1 = FeatureBatch {
                    logits: &[],
                    features: &queries[i * d..(i + 1) * d],
                    n: 1,
                };
                knn.score_batch(b1, &mut one).unwrap();
                assert_eq!(one[0], got[i]);
            }
            for i in 0..7 {
                let qn = {
                    let h = &queries[i * d..(i + 1) * d];
                    let n = h.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                    h.iter().map(|v| f64::from(*v) / n).collect::<Vec<f64>>()
                };
                let mut all: Vec<f64> = bank
                    .chunks_exact(d)
                    .map(|b| {
                        qn.iter()
                            .zip(b)
                            .map(|(x, y)| (x - f64::from(*y)).powi(2))
                            .sum()
                    })
                    .collect();
                all.sort_by(f64::total_cmp);
                assert_eq!(got[i], (-all[k - 1]) as f32, "query {i}, k = {k}");
            }
        }
    }
}
