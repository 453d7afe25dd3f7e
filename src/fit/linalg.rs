//! Small dense linear algebra in `f64` for fitting the detectors: symmetric
//! eigensolvers (Householder + QL, and cyclic Jacobi as a cross-check), the
//! pseudo-inverse of a symmetric
//! matrix (`scipy.linalg.pinvh`'s rule, which sklearn's `EmpiricalCovariance`
//! uses for `precision_`), the pseudo-inverse of a rectangular matrix applied
//! to a vector (`numpy.linalg.pinv(W) @ b`), and a row-major GEMM wrapper.
//!
//! Matrices are row-major `&[f64]` slices with their dimensions passed
//! alongside. Sizes here are at most a few hundred (feature dimension D ≤ 512,
//! or the number of classes), so O(n³) dense algorithms are fine.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};
use thiserror::Error;

/// A failure of a linear-algebra routine.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LinalgError {
    /// A slice did not have the length its stated dimensions imply.
    #[error("matrix data has {found} elements, expected {expected}")]
    Shape {
        /// Elements expected from the dimensions.
        expected: usize,
        /// Elements found.
        found: usize,
    },
    /// The input contained NaN or infinity.
    #[error("matrix contains a non-finite value")]
    NonFinite,
    /// The Jacobi iteration did not converge within its sweep limit.
    #[error("Jacobi eigensolver did not converge in {sweeps} sweeps (off-diagonal norm {off:e})")]
    NotConverged {
        /// Sweeps run.
        sweeps: usize,
        /// Remaining off-diagonal Frobenius norm.
        off: f64,
    },
}

/// Eigen-decomposition `A = V · diag(values) · Vᵀ` of a symmetric matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct SymEigen {
    /// Order of the matrix.
    pub n: usize,
    /// Eigenvalues, sorted in descending order.
    pub values: Vec<f64>,
    /// Eigenvectors as the columns of a row-major `n × n` matrix: the
    /// eigenvector of `values[j]` is `vectors[i * n + j]` for `i in 0..n`.
    pub vectors: Vec<f64>,
    /// Iterations it took (QL iterations for [`sym_eigen`], sweeps for
    /// [`sym_eigen_jacobi`]).
    pub sweeps: usize,
}

impl SymEigen {
    /// `V · diag(values) · Vᵀ`, row-major: the matrix this decomposes (up to
    /// rounding), for checking a decomposition.
    pub fn reconstruct(&self) -> Vec<f64> {
        let n = self.n;
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let mut s = 0.0;
                for l in 0..n {
                    s += self.vectors[i * n + l] * self.values[l] * self.vectors[j * n + l];
                }
                out[i * n + j] = s;
            }
        }
        out
    }
}

/// Most Jacobi sweeps before giving up; convergence is quadratic and takes
/// well under 20 sweeps for any matrix met in practice.
const MAX_SWEEPS: usize = 60;

/// Eigen-decomposition of the symmetric `n × n` row-major matrix `a`, in
/// `f64`: Householder reduction to tridiagonal form, then the implicit QL
/// algorithm (EISPACK `tred2`/`tql2`, as in the public-domain JAMA
/// `EigenvalueDecomposition`). Backward stable: eigenvalues carry an
/// absolute error of a few ε·‖A‖, eigenvectors are orthonormal to ~nε.
/// Only the symmetric part `(A + Aᵀ)/2` is used. About 9n³ flops: n = 512
/// takes well under a second.
pub fn sym_eigen(a: &[f64], n: usize) -> Result<SymEigen, LinalgError> {
    if a.len() != n * n {
        return Err(LinalgError::Shape {
            expected: n * n,
            found: a.len(),
        });
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    if n == 0 {
        return Ok(SymEigen {
            n,
            values: Vec::new(),
            vectors: Vec::new(),
            sweeps: 0,
        });
    }
    // The symmetric part (equal to its transpose, as tred2 expects).
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            v[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    let mut d = vec![0.0f64; n];
    let mut e = vec![0.0f64; n];
    tred2(&mut v, &mut d, &mut e, n);
    // tql2 rotates pairs of columns of V, i.e. rows of the Vᵀ in `v`.
    let mut vt = v;
    let iterations = tql2(&mut vt, &mut d, &mut e, n)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| d[j].total_cmp(&d[i]));
    let values: Vec<f64> = order.iter().map(|&i| d[i]).collect();
    let mut vectors = vec![0.0f64; n * n];
    for (col, &src) in order.iter().enumerate() {
        for i in 0..n {
            vectors[i * n + col] = vt[src * n + i];
        }
    }
    Ok(SymEigen {
        n,
        values,
        vectors,
        sweeps: iterations,
    })
}

/// Householder tridiagonalisation (JAMA `tred2`) of the symmetric matrix in
/// `v`: on return `d` is the diagonal, `e[1..]` the sub-diagonal, and `v`
/// holds **Vᵀ**, V being the accumulated orthogonal transformation.
fn tred2(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) {
    // V[r][c] is stored at v[c·n + r] (V transposed): every O(n³) loop of
    // the algorithm then runs along a contiguous row.
    let at = |r: usize, c: usize| c * n + r;
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
    }
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
                v[at(j, i)] = 0.0;
            }
        } else {
            // Householder vector.
            for dk in &mut d[..i] {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            // Apply the similarity transformation to the remaining columns.
            for j in 0..i {
                f = d[j];
                v[at(j, i)] = f;
                g = e[j] + v[at(j, j)] * f;
                for k in j + 1..i {
                    g += v[at(k, j)] * d[k];
                    e[k] += v[at(k, j)] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[at(k, j)] -= f * e[k] + g * d[k];
                }
                d[j] = v[at(i - 1, j)];
                v[at(i, j)] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[at(n - 1, i)] = v[at(i, i)];
        v[at(i, i)] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[at(k, i + 1)] / h;
            }
            for j in 0..=i {
                let mut g = 0.0;
                for k in 0..=i {
                    g += v[at(k, i + 1)] * v[at(k, j)];
                }
                for k in 0..=i {
                    v[at(k, j)] -= g * d[k];
                }
            }
        }
        for k in 0..=i {
            v[at(k, i + 1)] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[at(n - 1, j)];
        v[at(n - 1, j)] = 0.0;
    }
    v[at(n - 1, n - 1)] = 1.0;
    e[0] = 0.0;
}

/// Implicit-shift QL on the tridiagonal `d`, `e` (JAMA `tql2`), rotating the
/// rows of `vt` (= columns of V). Returns the QL iterations taken.
fn tql2(vt: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize) -> Result<usize, LinalgError> {
    /// Iterations allowed per eigenvalue (typically 1–3).
    const MAX_ITER: usize = 60;
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0.0f64;
    let eps = f64::EPSILON;
    let mut total = 0;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n {
            if e[m].abs() <= eps * tst1 {
                break;
            }
            m += 1;
        }
        // m < n always: e[n-1] = 0.
        if m > l {
            let mut iter = 0;
            loop {
                iter += 1;
                if iter > MAX_ITER {
                    return Err(LinalgError::NotConverged {
                        sweeps: total + iter,
                        off: e[l].abs(),
                    });
                }
                // Implicit shift.
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().skip(l + 2) {
                    *di -= h;
                }
                f += h;
                // Implicit QL transformation.
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    // Rotate columns i, i+1 of V (rows of Vᵀ).
                    let (ri, ri1) = two_rows(vt, n, i, i + 1);
                    for k in 0..n {
                        let h = ri1[k];
                        ri1[k] = s * ri[k] + c * h;
                        ri[k] = c * ri[k] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
            total += iter;
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(total)
}

/// Eigen-decomposition of the symmetric `n × n` row-major matrix `a` by
/// cyclic Jacobi rotations (Rutishauser's formulation, as in *Numerical
/// Recipes* §11.1), in `f64`.
///
/// Only the symmetric part `(A + Aᵀ)/2` is used. Simple and very accurate,
/// but about 10 sweeps × 3n³ flops with strided column updates: n = 512
/// takes ~8 s. The fit uses [`sym_eigen`]; this one cross-checks it in the
/// tests and serves small matrices equally well.
pub fn sym_eigen_jacobi(a: &[f64], n: usize) -> Result<SymEigen, LinalgError> {
    if a.len() != n * n {
        return Err(LinalgError::Shape {
            expected: n * n,
            found: a.len(),
        });
    }
    if a.iter().any(|v| !v.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    // Work on the symmetric part.
    let mut m = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    // Eigenvectors are accumulated as the *rows* of `vt` so that a rotation
    // touches two contiguous rows.
    let mut vt = vec![0.0f64; n * n];
    for i in 0..n {
        vt[i * n + i] = 1.0;
    }
    let frob = m.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut sweeps = 0;
    let mut converged = n <= 1 || frob == 0.0;
    while !converged {
        if sweeps == MAX_SWEEPS {
            return Err(LinalgError::NotConverged {
                sweeps,
                off: off_diagonal_norm(&m, n),
            });
        }
        sweeps += 1;
        let off = off_diagonal_norm(&m, n);
        // Converged when the off-diagonal mass is at rounding level of ‖A‖.
        if off <= 1e-17 * frob {
            break;
        }
        // Threshold strategy of NR: in the first sweeps skip small elements.
        let threshold = if sweeps < 4 {
            0.2 * off / (n * n) as f64
        } else {
            0.0
        };
        let mut rotated = false;
        for p in 0..n - 1 {
            for q in p + 1..n {
                let apq = m[p * n + q];
                let app = m[p * n + p];
                let aqq = m[q * n + q];
                // Negligible against both diagonal entries (or against ‖A‖):
                // set it to zero without rotating.
                let g = 100.0 * apq.abs();
                if sweeps > 4
                    && (app.abs() + g == app.abs() && aqq.abs() + g == aqq.abs()
                        || apq.abs() <= 1e-20 * frob)
                {
                    m[p * n + q] = 0.0;
                    m[q * n + p] = 0.0;
                    continue;
                }
                if apq.abs() <= threshold || apq == 0.0 {
                    continue;
                }
                rotated = true;
                let theta = 0.5 * (aqq - app) / apq;
                let t = if theta.abs() > 1e150 {
                    0.5 / theta
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                let tau = s / (1.0 + c);
                m[p * n + p] = app - t * apq;
                m[q * n + q] = aqq + t * apq;
                m[p * n + q] = 0.0;
                m[q * n + p] = 0.0;
                // Rows p and q (contiguous); columns by symmetry.
                let (row_p, row_q) = two_rows(&mut m, n, p, q);
                for k in 0..n {
                    if k == p || k == q {
                        continue;
                    }
                    let akp = row_p[k];
                    let akq = row_q[k];
                    row_p[k] = akp - s * (akq + tau * akp);
                    row_q[k] = akq + s * (akp - tau * akq);
                }
                for k in 0..n {
                    if k == p || k == q {
                        continue;
                    }
                    m[k * n + p] = m[p * n + k];
                    m[k * n + q] = m[q * n + k];
                }
                let (vp, vq) = two_rows(&mut vt, n, p, q);
                for k in 0..n {
                    let a0 = vp[k];
                    let b0 = vq[k];
                    vp[k] = a0 - s * (b0 + tau * a0);
                    vq[k] = b0 + s * (a0 - tau * b0);
                }
            }
        }
        if !rotated && sweeps > 4 {
            converged = true;
        }
    }
    // Sort descending; NaN cannot occur (inputs were finite).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[j * n + j].total_cmp(&m[i * n + i]));
    let values: Vec<f64> = order.iter().map(|&i| m[i * n + i]).collect();
    let mut vectors = vec![0.0f64; n * n];
    for (col, &src) in order.iter().enumerate() {
        for i in 0..n {
            vectors[i * n + col] = vt[src * n + i];
        }
    }
    Ok(SymEigen {
        n,
        values,
        vectors,
        sweeps,
    })
}

fn off_diagonal_norm(m: &[f64], n: usize) -> f64 {
    let mut s = 0.0;
    for i in 0..n {
        for j in 0..n {
            if i != j {
                s += m[i * n + j] * m[i * n + j];
            }
        }
    }
    s.sqrt()
}

/// Mutable views of rows `p < q` of a row-major matrix with `n` columns.
fn two_rows(m: &mut [f64], n: usize, p: usize, q: usize) -> (&mut [f64], &mut [f64]) {
    debug_assert!(p < q);
    let (head, tail) = m.split_at_mut(q * n);
    (&mut head[p * n..p * n + n], &mut tail[..n])
}

/// A pseudo-inverse with what the cutoff dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct PseudoInverse {
    /// The `n × n` row-major pseudo-inverse.
    pub matrix: Vec<f64>,
    /// How many eigenvalues fell at or below the cutoff and were dropped
    /// (0 when the matrix is well conditioned).
    pub dropped: usize,
    /// Largest |eigenvalue|.
    pub max_eigenvalue: f64,
    /// Smallest |eigenvalue| kept.
    pub min_kept_eigenvalue: f64,
}

/// The default relative cutoff of [`pinvh`]: `n · ε(f64)`, as
/// `scipy.linalg.pinvh` for a float64 matrix (`rtol = max(M, N) * eps`).
pub fn default_rtol(n: usize) -> f64 {
    n as f64 * f64::EPSILON
}

/// Pseudo-inverse of a symmetric matrix, following `scipy.linalg.pinvh`:
/// eigenvalues with `|λ| <= rtol · max|λ|` are dropped, the rest inverted,
/// `B = Σ_{kept} v vᵀ / λ`.
///
/// sklearn's `EmpiricalCovariance` (used by OpenOOD's MDS, RMDS) sets
/// `precision_ = pinvh(covariance_)` with the default `rtol`
/// ([`default_rtol`]).
pub fn pinvh(a: &[f64], n: usize, rtol: f64) -> Result<PseudoInverse, LinalgError> {
    let eig = sym_eigen(a, n)?;
    let max = eig.values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let cutoff = rtol * max;
    let kept: Vec<usize> = (0..n)
        .filter(|&l| eig.values[l].abs() > cutoff && eig.values[l] != 0.0)
        .collect();
    let dropped = n - kept.len();
    let min_kept = kept
        .iter()
        .fold(f64::INFINITY, |m, &l| m.min(eig.values[l].abs()));
    // B = (V_k Λ_k⁻¹) V_kᵀ, by GEMM.
    let r = kept.len();
    let mut scaled = vec![0.0f64; n * r];
    let mut vkt = vec![0.0f64; r * n];
    for i in 0..n {
        for (c, &l) in kept.iter().enumerate() {
            let v = eig.vectors[i * n + l];
            scaled[i * r + c] = v / eig.values[l];
            vkt[c * n + i] = v;
        }
    }
    let mut out = gemm(&scaled, n, r, &vkt, n);
    // Exact symmetry.
    for i in 0..n {
        for j in i + 1..n {
            let v = 0.5 * (out[i * n + j] + out[j * n + i]);
            out[i * n + j] = v;
            out[j * n + i] = v;
        }
    }
    Ok(PseudoInverse {
        matrix: out,
        dropped,
        max_eigenvalue: max,
        min_kept_eigenvalue: min_kept,
    })
}

/// `pinv(W) · b` for a row-major `rows × cols` matrix `W` and a vector `b` of
/// length `rows`: the minimum-norm least-squares solution of `W x = b`.
///
/// Computed through the smaller Gram matrix: `pinv(W) = Wᵀ (W Wᵀ)⁺` when
/// `rows <= cols`, else `(WᵀW)⁺ Wᵀ`, with [`pinvh`] and cutoff
/// `rtol = max(rows, cols) · ε`. This equals `numpy.linalg.pinv(W) @ b` when
/// W is not nearly rank-deficient (numpy's cutoff is on singular values at
/// 1e-15·σ_max; through the Gram matrix, σ below ≈ 1e-7·σ_max are dropped).
pub fn pinv_apply(w: &[f64], rows: usize, cols: usize, b: &[f64]) -> Result<Vec<f64>, LinalgError> {
    if w.len() != rows * cols {
        return Err(LinalgError::Shape {
            expected: rows * cols,
            found: w.len(),
        });
    }
    if b.len() != rows {
        return Err(LinalgError::Shape {
            expected: rows,
            found: b.len(),
        });
    }
    let rtol = default_rtol(rows.max(cols));
    if rows <= cols {
        // G = W Wᵀ (rows × rows); x = Wᵀ G⁺ b.
        let g = gemm(w, rows, cols, &transpose(w, rows, cols), rows);
        let gi = pinvh(&g, rows, rtol)?;
        let y = matvec(&gi.matrix, rows, rows, b);
        Ok(matvec(&transpose(w, rows, cols), cols, rows, &y))
    } else {
        // G = WᵀW (cols × cols); x = G⁺ (Wᵀ b).
        let wt = transpose(w, rows, cols);
        let g = gemm(&wt, cols, rows, w, cols);
        let gi = pinvh(&g, cols, rtol)?;
        let wtb = matvec(&wt, cols, rows, b);
        Ok(matvec(&gi.matrix, cols, cols, &wtb))
    }
}

/// Transpose of a row-major `rows × cols` matrix.
pub fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = a[i * cols + j];
        }
    }
    out
}

/// `A · x` for a row-major `rows × cols` matrix.
pub fn matvec(a: &[f64], rows: usize, cols: usize, x: &[f64]) -> Vec<f64> {
    (0..rows)
        .map(|i| {
            a[i * cols..(i + 1) * cols]
                .iter()
                .zip(x)
                .map(|(p, q)| p * q)
                .sum()
        })
        .collect()
}

/// `C = A · B` for row-major `A` (`m × k`) and `B` (`k × n`), by
/// `ndarray`'s GEMM (`matrixmultiply`, single thread, run-time SIMD
/// dispatch inside the dependency: no `unsafe` here).
///
/// # Panics
/// If a slice is shorter than its dimensions imply (a caller bug: every
/// caller in this crate sizes its buffers from the same dimensions).
pub fn gemm(a: &[f64], m: usize, k: usize, b: &[f64], n: usize) -> Vec<f64> {
    let mut c = vec![0.0f64; m * n];
    gemm_into(a, m, k, b, n, 0.0, &mut c);
    c
}

/// `C ← A · B + β C`, row-major, as [`gemm`].
///
/// # Panics
/// If a slice is shorter than its dimensions imply.
pub fn gemm_into(a: &[f64], m: usize, k: usize, b: &[f64], n: usize, beta: f64, c: &mut [f64]) {
    let a = ArrayView2::from_shape((m, k), &a[..m * k]).expect("gemm: A is m × k");
    let b = ArrayView2::from_shape((k, n), &b[..k * n]).expect("gemm: B is k × n");
    let mut c = ArrayViewMut2::from_shape((m, n), &mut c[..m * n]).expect("gemm: C is m × n");
    general_mat_mul(1.0, &a, &b, beta, &mut c);
}

/// `C ← C + Xᵀ X` for a row-major `n × d` matrix `X` and a `d × d` `C`
/// (a scatter-matrix update).
///
/// # Panics
/// If `x` is shorter than `n · d` or `c` than `d · d`.
pub fn add_gram(x: &[f64], n: usize, d: usize, c: &mut [f64]) {
    let x = ArrayView2::from_shape((n, d), &x[..n * d]).expect("add_gram: X is n × d");
    let mut c = ArrayViewMut2::from_shape((d, d), &mut c[..d * d]).expect("add_gram: C is d × d");
    general_mat_mul(1.0, &x.t(), &x, 1.0, &mut c);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random symmetric matrix with a known spectrum:
    /// Q diag(λ) Qᵀ with Q from Gram–Schmidt.
    fn spd(n: usize, seed: u64, spectrum: impl Fn(usize) -> f64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = crate::fit::rng::SplitMix64::new(seed);
        let mut q = vec![0.0; n * n];
        for v in &mut q {
            *v = rng.next_f64() - 0.5;
        }
        // Gram–Schmidt on columns.
        for j in 0..n {
            for p in 0..j {
                let d: f64 = (0..n).map(|i| q[i * n + j] * q[i * n + p]).sum();
                for i in 0..n {
                    q[i * n + j] -= d * q[i * n + p];
                }
            }
            let norm: f64 = (0..n).map(|i| q[i * n + j].powi(2)).sum::<f64>().sqrt();
            for i in 0..n {
                q[i * n + j] /= norm;
            }
        }
        let lambda: Vec<f64> = (0..n).map(&spectrum).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n)
                    .map(|l| q[i * n + l] * lambda[l] * q[j * n + l])
                    .sum();
            }
        }
        (a, lambda)
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    type Solver = fn(&[f64], usize) -> Result<SymEigen, LinalgError>;
    const SOLVERS: [(&str, Solver); 2] = [("ql", sym_eigen), ("jacobi", sym_eigen_jacobi)];

    #[test]
    fn eigen_reconstructs_and_is_orthonormal() {
        for (name, solve) in SOLVERS {
            for &n in &[1usize, 2, 3, 7, 64] {
                let (a, mut lambda) = spd(n, 42 + n as u64, |i| 1.0 + i as f64 * 0.37);
                let eig = solve(&a, n).unwrap();
                let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                let err = max_abs_diff(&eig.reconstruct(), &a);
                assert!(
                    err <= 1e-13 * scale.max(1.0),
                    "{name} n={n}: reconstruction error {err:e}"
                );
                // Vᵀ V = I.
                let v = &eig.vectors;
                for p in 0..n {
                    for q in 0..n {
                        let d: f64 = (0..n).map(|i| v[i * n + p] * v[i * n + q]).sum();
                        let want = if p == q { 1.0 } else { 0.0 };
                        assert!((d - want).abs() < 1e-13, "n={n}: VᵀV[{p},{q}] = {d}");
                    }
                }
                lambda.sort_by(|x, y| y.total_cmp(x));
                assert!(
                    max_abs_diff(&eig.values, &lambda) < 1e-12,
                    "{:?} vs {:?}",
                    eig.values,
                    lambda
                );
            }
        }
    }

    #[test]
    fn eigen_hand_checked_2x2_and_diagonal() {
        for (_, solve) in SOLVERS {
            // [[2,1],[1,2]]: eigenvalues 3 and 1, vectors (1,1)/√2 and (1,-1)/√2.
            let eig = solve(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
            assert!((eig.values[0] - 3.0).abs() < 1e-15 && (eig.values[1] - 1.0).abs() < 1e-15);
            let h = std::f64::consts::FRAC_1_SQRT_2;
            assert!(
                (eig.vectors[0].abs() - h).abs() < 1e-15
                    && (eig.vectors[2].abs() - h).abs() < 1e-15
            );
            assert!(
                eig.vectors[0] * eig.vectors[2] > 0.0,
                "first vector is ±(1,1)"
            );
            // Already diagonal: no sweep changes anything.
            let eig = solve(&[1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, -2.0], 3).unwrap();
            assert_eq!(eig.values, vec![5.0, 1.0, -2.0]);
        }
    }

    #[test]
    fn eigen_handles_repeated_and_zero_eigenvalues_and_large_n() {
        for (name, solve) in SOLVERS {
            // Rank-deficient with a repeated eigenvalue.
            let (a, _) = spd(40, 7, |i| {
                if i < 10 {
                    0.0
                } else if i < 20 {
                    2.0
                } else {
                    1.0 + i as f64
                }
            });
            let eig = solve(&a, 40).unwrap();
            assert!(max_abs_diff(&eig.reconstruct(), &a) < 1e-12);
            assert!(
                eig.values[30..].iter().all(|v| v.abs() < 1e-12),
                "{:?}",
                &eig.values[30..]
            );
            // Widely spread spectrum (condition 1e12, tiny eigenvalues clustered
            // in absolute terms, the slow case for Jacobi): small eigenvalues
            // keep absolute accuracy relative to ‖A‖.
            let (a, _) = spd(128, 9, |i| 10f64.powf(-12.0 * i as f64 / 127.0));
            let eig = solve(&a, 128).unwrap();
            assert!(max_abs_diff(&eig.reconstruct(), &a) < 1e-14, "{name}");
            assert!(eig.sweeps <= 30 * 128, "{name}: iterations {}", eig.sweeps);
        }
    }

    /// The two solvers agree on eigenvalues and on the projector onto the
    /// span of the smallest half of the eigenvectors (what ViM stores).
    #[test]
    fn ql_and_jacobi_agree() {
        let n = 96;
        let (a, _) = spd(n, 21, |i| 1.0 / (1.0 + i as f64).powi(2));
        let (x, y) = (sym_eigen(&a, n).unwrap(), sym_eigen_jacobi(&a, n).unwrap());
        assert!(max_abs_diff(&x.values, &y.values) < 1e-14);
        let half = |e: &SymEigen| {
            let mut p = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    p[i * n + j] = (n / 2..n)
                        .map(|l| e.vectors[i * n + l] * e.vectors[j * n + l])
                        .sum();
                }
            }
            p
        };
        assert!(max_abs_diff(&half(&x), &half(&y)) < 1e-10);
    }

    #[test]
    fn eigen_rejects_bad_input() {
        for (_, solve) in SOLVERS {
            assert!(matches!(
                solve(&[1.0, 2.0], 2),
                Err(LinalgError::Shape { .. })
            ));
            assert_eq!(solve(&[f64::NAN], 1), Err(LinalgError::NonFinite));
            assert_eq!(solve(&[], 0).unwrap().values, Vec::<f64>::new());
            assert_eq!(solve(&[3.0], 1).unwrap().values, vec![3.0]);
        }
    }

    #[test]
    fn pinvh_inverts_a_well_conditioned_matrix() {
        let n = 16;
        let (a, _) = spd(n, 3, |i| 0.5 + i as f64);
        let p = pinvh(&a, n, default_rtol(n)).unwrap();
        assert_eq!(p.dropped, 0);
        let prod = gemm(&a, n, n, &p.matrix, n);
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (prod[i * n + j] - want).abs() < 1e-12,
                    "A·A⁻¹[{i},{j}] = {}",
                    prod[i * n + j]
                );
            }
        }
    }

    #[test]
    fn pinvh_drops_null_directions_like_scipy() {
        // diag(4, 1, 0) in a rotated basis: pinvh = rotated diag(1/4, 1, 0).
        let n = 3;
        let (a, _) = spd(n, 11, |i| [4.0, 1.0, 0.0][i]);
        let p = pinvh(&a, n, default_rtol(n)).unwrap();
        assert_eq!(p.dropped, 1);
        // Moore–Penrose conditions A P A = A and P A P = P.
        let apa = gemm(&gemm(&a, n, n, &p.matrix, n), n, n, &a, n);
        let pap = gemm(&gemm(&p.matrix, n, n, &a, n), n, n, &p.matrix, n);
        assert!(max_abs_diff(&apa, &a) < 1e-13);
        assert!(max_abs_diff(&pap, &p.matrix) < 1e-13);
        // A larger rtol drops the 1 as well.
        assert_eq!(pinvh(&a, n, 0.5).unwrap().dropped, 2);
    }

    #[test]
    fn pinv_apply_solves_min_norm_least_squares() {
        // Wide W (2×3): x = Wᵀ(WWᵀ)⁻¹ b satisfies W x = b exactly.
        let w = [1.0, 2.0, 0.0, 0.0, 1.0, 1.0];
        let b = [3.0, -1.0];
        let x = pinv_apply(&w, 2, 3, &b).unwrap();
        let wx = matvec(&w, 2, 3, &x);
        assert!(max_abs_diff(&wx, &b) < 1e-14);
        // Min-norm: x lies in the row space of W, i.e. x = Wᵀ y.
        // Tall W (3×2): least squares, Wᵀ(Wx − b) = 0.
        let wt = transpose(&w, 2, 3);
        let b3 = [1.0, 0.0, 2.0];
        let x = pinv_apply(&wt, 3, 2, &b3).unwrap();
        let r: Vec<f64> = matvec(&wt, 3, 2, &x)
            .iter()
            .zip(&b3)
            .map(|(p, q)| p - q)
            .collect();
        let normal = matvec(&w, 2, 3, &r);
        assert!(normal.iter().all(|v| v.abs() < 1e-14), "{normal:?}");
    }
}
