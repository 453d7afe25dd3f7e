//! Virtual-logit matching (Wang et al., CVPR 2022), as OpenOOD's
//! `vim_postprocessor.py`.

use super::{lse, to_f64, Detector, DetectorError, FeatureBatch};
use crate::fit::linalg;
use crate::fit::stats::Stats;

/// ViM: `score(h, z) = logsumexp(z) − α · ‖(h − u)ᵀ · NS‖`.
///
/// `u = −pinv(W)·b` is the feature-space origin at which all logits vanish;
/// NS holds the eigenvectors of the D − D_p smallest eigenvalues of the
/// uncentred second moment `(1/N) Σ (h_i − u)(h_i − u)ᵀ`; α is the mean
/// training max-logit over the mean training residual norm.
///
/// OpenOOD v1.5 `vim_postprocessor.py`: `u` (l. 41),
/// `EmpiricalCovariance(assume_centered=True).fit(h − u)` and `eig` (l. 42–44),
/// `NS` = eigenvectors of `argsort(−λ)[dim:]` (l. 57–58), α with the max of
/// the recomputed training logits `h W ᵀ + b` (l. 39, 60–64), and
/// `score = −vlogit + energy` with `vlogit = α ‖(h − u) NS‖`,
/// `energy = logsumexp(logits)` (l. 73–76). OpenOOD recomputes the logits
/// from the features; here the frame's own logits are used (equal up to the
/// model's f32 rounding). D_p is chosen when the detector is built (the
/// statistics hold every eigenvector and α for every D_p).
#[derive(Debug, Clone)]
pub struct Vim {
    k: usize,
    d: usize,
    cols: usize,
    dim: usize,
    origin: Vec<f64>,
    null_space: Vec<f64>,
    alpha: f64,
}

impl Vim {
    /// ViM from fitted statistics with principal dimension `dim` (D_p;
    /// `None` for the fitted default), in 1..D.
    pub fn new(stats: &Stats, dim: Option<usize>) -> Result<Self, DetectorError> {
        let d = stats.dim();
        let dim = dim.unwrap_or(stats.meta.vim_dim);
        if dim == 0 || dim >= d {
            return Err(DetectorError::Param {
                name: "dim",
                value: dim.to_string(),
                reason: format!("ViM's principal dimension must be in 1..{d}"),
            });
        }
        let cols = d - dim;
        let mut null_space = vec![0.0f64; d * cols];
        for i in 0..d {
            null_space[i * cols..(i + 1) * cols]
                .copy_from_slice(&stats.vim_eigenvectors[i * d + dim..(i + 1) * d]);
        }
        Ok(Self {
            k: stats.num_classes(),
            d,
            cols,
            dim,
            origin: stats.vim_origin.clone(),
            null_space,
            alpha: stats.vim_mean_max_logit / stats.vim_mean_residual[dim - 1],
        })
    }

    /// α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

impl Detector for Vim {
    fn name(&self) -> &'static str {
        "vim"
    }

    fn tag(&self) -> String {
        format!("vim(dim={})", self.dim)
    }

    fn score_batch(&self, batch: FeatureBatch<'_>, out: &mut [f32]) -> Result<(), DetectorError> {
        let (k, d, cols) = (self.k, self.d, self.cols);
        batch.check(out, Some(k), Some(d))?;
        let mut centered = to_f64(batch.features);
        for row in centered.chunks_exact_mut(d) {
            for (v, u) in row.iter_mut().zip(&self.origin) {
                *v -= u;
            }
        }
        let proj = linalg::gemm(&centered, batch.n, d, &self.null_space, cols);
        for i in 0..batch.n {
            let residual = proj[i * cols..(i + 1) * cols]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            let energy = lse(batch.logits_row(i, k).iter().map(|v| f64::from(*v)));
            out[i] = (energy - self.alpha * residual) as f32;
        }
        Ok(())
    }
}
