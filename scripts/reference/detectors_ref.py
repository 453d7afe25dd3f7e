#!/usr/bin/env python3
"""Independent NumPy reference for the feature-space OOD detectors.

Written from the OpenOOD v1.5 postprocessors (openood/postprocessors/
{knn,vim,mds,rmds,react,fdbd,gen}_postprocessor.py), not from the Rust code:
every statistic is computed the direct way, on the whole arrays, in float64.

It generates a deterministic synthetic problem: K = 10 classes, D = 64
features drawn from class-conditional Gaussians pushed through a softplus (so
that they are positive like pooled post-ReLU activations), a random final
layer W, b; 5,000 training frames, 500 in-distribution validation frames and
300 test frames (150 ID, 150 OOD of three kinds). Inputs are rounded to
float32 (as an ONNX model would give them) and everything downstream is
computed in float64 from those float32 values.

Output: one safetensors file (written by hand below; NumPy only) holding the
inputs, the expected fit statistics and the expected score of every detector
on the test frames, plus the parameters as JSON metadata. The Rust
integration test `tests/reference.rs` fits its own statistics from the same
inputs and compares.

Usage: python3 scripts/reference/detectors_ref.py [OUT]
       (default OUT: tests/data/detectors/synthetic_k10_d64.safetensors)
"""

import json
import os
import sys

import numpy as np

K, D = 10, 64
N_TRAIN, N_VAL = 5000, 500
SEED = 13

KNN_KS = [1, 50, 200]
VIM_DIM = 32  # D/2, OpenOOD's choice for small D (256 for D = 512, 42 for D = 84)
REACT_PERCENTILES = [85.0, 90.0, 95.0, 99.0]
GEN_PARAMS = [(0.1, 100), (0.1, 5), (0.5, 10)]  # (gamma, M)
COMBINATION = [("vim", 0.7), ("knn", 0.3)]  # with knn at k = 50


# --------------------------------------------------------------------------
# Synthetic data

def softplus(x):
    return np.logaddexp(0.0, x)


def make_problem():
    rng = np.random.default_rng(SEED)
    # Shared covariance with a spread, distinct spectrum.
    a = rng.normal(size=(D, D)) / np.sqrt(D)
    cov = 0.5 * a @ a.T + 0.05 * np.eye(D)
    chol = np.linalg.cholesky(cov)
    means = rng.normal(scale=1.0, size=(K, D))

    def draw(mu):
        return softplus(mu + rng.normal(size=mu.shape) @ chol.T)

    y_train = rng.integers(0, K, size=N_TRAIN)
    y_train[:K] = np.arange(K)  # every class present
    h_train = draw(means[y_train])
    y_val = rng.integers(0, K, size=N_VAL)
    h_val = draw(means[y_val])

    # Test: 150 ID, 50 far OOD (new means), 50 near OOD (between two
    # classes), 50 ID frames with activations blown up x3 (ReAct's case).
    y_id = rng.integers(0, K, size=150)
    h_id = draw(means[y_id])
    far = rng.normal(scale=1.5, size=(50, D))
    h_far = draw(far)
    pairs = rng.integers(0, K, size=(50, 2))
    h_near = draw(0.5 * (means[pairs[:, 0]] + means[pairs[:, 1]]))
    h_big = 3.0 * draw(means[rng.integers(0, K, size=50)])
    h_test = np.concatenate([h_id, h_far, h_near, h_big])
    is_id = np.concatenate([np.ones(150), np.zeros(150)])

    # Final layer: aligned with the class means, plus noise.
    w = 0.8 * (means - means.mean(0)) + 0.1 * rng.normal(size=(K, D))
    b = 0.1 * rng.normal(size=K)

    f32 = lambda v: np.asarray(v, dtype=np.float32)
    w32, b32 = f32(w), f32(b)
    out = {"fc.weight": w32, "fc.bias": b32}
    for name, h in [("train", h_train), ("val", h_val), ("test", h_test)]:
        h32 = f32(h)
        z = h32.astype(np.float64) @ w32.astype(np.float64).T + b32.astype(np.float64)
        out[f"{name}.features"] = h32
        out[f"{name}.logits"] = f32(z)
    out["train.labels"] = y_train.astype(np.int64)
    out["test.is_id"] = is_id.astype(np.int64)
    return out


# --------------------------------------------------------------------------
# Fit, the direct way

def pinvh(a):
    """scipy.linalg.pinvh's rule (what sklearn's EmpiricalCovariance uses
    for precision_): drop eigenvalues |l| <= max(shape) * eps * max|l|."""
    lam, vec = np.linalg.eigh(a)
    cutoff = max(a.shape) * np.finfo(np.float64).eps * np.abs(lam).max()
    keep = np.abs(lam) > cutoff
    return (vec[:, keep] / lam[keep]) @ vec[:, keep].T


def fit(x, y, logits_fc, w, b):
    """x: N x D float64 features, y: labels, w/b: float64 final layer."""
    n = x.shape[0]
    stats = {}
    # MDS (mds_postprocessor.py l. 46-62): class means, covariance of the
    # concatenated class-centred features (EmpiricalCovariance with
    # assume_centered=False = np.cov(bias=True)), precision = pinvh.
    class_means = np.stack([x[y == c].mean(0) for c in range(K)])
    centred = np.concatenate([x[y == c] - class_means[c] for c in range(K)])
    stats["class_means"] = class_means
    stats["mds.precision"] = pinvh(np.cov(centred.T, bias=True))
    # RMDS (rmds_postprocessor.py l. 64-70): one Gaussian on all features.
    whole_mean = x.mean(0)
    stats["train_mean"] = whole_mean
    stats["rmds.background_precision"] = pinvh(np.cov((x - whole_mean).T, bias=True))
    # ViM (vim_postprocessor.py l. 39-64).
    u = -np.linalg.pinv(w) @ b
    xc = x - u
    second_moment = xc.T @ xc / n  # EmpiricalCovariance(assume_centered=True)
    lam, vec = np.linalg.eigh(second_moment)
    order = np.argsort(-lam)
    ns = vec[:, order[VIM_DIM:]]
    max_logit = (x @ w.T + b).max(axis=1).mean()
    residual = np.linalg.norm(xc @ ns, axis=1).mean()
    stats["vim.origin"] = u
    stats["vim.null_space"] = ns
    stats["vim.alpha"] = np.array(max_logit / residual)
    stats["vim.eigenvalues"] = lam[order]
    # ReAct (react_postprocessor.py l. 39-40), over the training features.
    stats["react.percentiles"] = np.array(REACT_PERCENTILES)
    stats["react.clip"] = np.array([np.percentile(x.flatten(), p) for p in REACT_PERCENTILES])
    # KNN bank (knn_postprocessor.py l. 11, 36-41).
    stats["knn.bank"] = x / np.linalg.norm(x, axis=1, keepdims=True)
    stats["train_accuracy"] = np.array((logits_fc.argmax(1) == y).mean())
    return stats


# --------------------------------------------------------------------------
# Scores (higher = more in-distribution)

def logsumexp(z):
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def score_knn(stats, h, k):
    # faiss IndexFlatL2 returns squared L2 distances; score = -D[:, k-1].
    q = h / np.linalg.norm(h, axis=1, keepdims=True)
    bank = stats["knn.bank"]
    d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None, :] - 2.0 * q @ bank.T
    return -np.sort(d2, axis=1)[:, k - 1]


def score_vim(stats, h, z):
    vlogit = np.linalg.norm((h - stats["vim.origin"]) @ stats["vim.null_space"], axis=1)
    return -stats["vim.alpha"] * vlogit + logsumexp(z)


def mahalanobis(h, mean, precision):
    d = h - mean
    return np.einsum("ij,jk,ik->i", d, precision, d)


def score_mds(stats, h):
    scores = np.stack([-mahalanobis(h, stats["class_means"][c], stats["mds.precision"])
                       for c in range(K)], axis=1)
    return scores.max(axis=1)


def score_rmds(stats, h):
    background = -mahalanobis(h, stats["train_mean"], stats["rmds.background_precision"])
    scores = np.stack([-mahalanobis(h, stats["class_means"][c], stats["mds.precision"]) - background
                       for c in range(K)], axis=1)
    return scores.max(axis=1)


def score_react(stats, h, w, b, p):
    clip = stats["react.clip"][REACT_PERCENTILES.index(p)]
    return logsumexp(np.minimum(h, clip) @ w.T + b)


def score_fdbd(stats, h, z, w, train_mean_normalizer=True):
    pred = z.argmax(axis=1)
    denom = np.stack([np.linalg.norm(w - w[p], axis=1) for p in range(K)])
    denom[np.arange(K), np.arange(K)] = 1.0
    num = (np.abs(z - z[np.arange(len(z)), pred][:, None]) / denom[pred]).sum(axis=1)
    centre = stats["train_mean"] if train_mean_normalizer else 0.0
    return num / np.linalg.norm(h - centre, axis=1)


def score_gen(z, gamma, m):
    # gen_postprocessor.py l. 32-38: -sum over the M largest p of
    # p^g (1-p)^g. With g = 0.1, (1-p)^g is very sensitive to 1-p when
    # p -> 1 (1e-12^0.1 = 0.06), and 1.0 - p in floating point is 0 there
    # (OpenOOD, in float32, rounds it to 0 once 1-p < 6e-8). The reference
    # evaluates the exact function in the log domain instead:
    # log p_j = z_j - lse(z), log(1-p_j) = lse(z without j) - lse(z).
    n, k = z.shape
    lse = logsumexp(z)
    log_p = z - lse[:, None]
    log_q = np.empty_like(z)
    for j in range(k):
        log_q[:, j] = logsumexp(np.delete(z, j, axis=1)) - lse
    terms = np.exp(gamma * (log_p + log_q))
    order = np.argsort(log_p, axis=1, kind="stable")[:, -m:]
    return -np.take_along_axis(terms, order, axis=1).sum(axis=1)


def auroc(scores, is_id):
    """P(score of a random ID frame > that of a random OOD frame)."""
    pos, neg = scores[is_id == 1], scores[is_id == 0]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return greater + 0.5 * ties


# --------------------------------------------------------------------------
# Minimal safetensors writer (NumPy only)

DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        raw = arr.tobytes()
        header[name] = {"dtype": DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for raw in blobs:
            f.write(raw)


# --------------------------------------------------------------------------

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "tests", "data", "detectors", "synthetic_k10_d64.safetensors")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    data = make_problem()
    f64 = lambda name: data[name].astype(np.float64)
    w, b = f64("fc.weight"), f64("fc.bias")
    x, y = f64("train.features"), data["train.labels"]
    stats = fit(x, y, f64("train.logits"), w, b)

    def all_scores(h, z):
        s = {}
        for k in KNN_KS:
            s[f"knn(k={k})"] = score_knn(stats, h, k)
        s[f"vim(dim={VIM_DIM})"] = score_vim(stats, h, z)
        s["mds"] = score_mds(stats, h)
        s["rmds"] = score_rmds(stats, h)
        for p in REACT_PERCENTILES:
            s[f"react(p={p:g})"] = score_react(stats, h, w, b, p)
        s["fdbd(train_mean)"] = score_fdbd(stats, h, z, w, True)
        s["fdbd(feature_norm)"] = score_fdbd(stats, h, z, w, False)
        for gamma, m in GEN_PARAMS:
            s[f"gen(gamma={gamma:g},M={min(m, K)})"] = score_gen(z, gamma, m)
        return s

    test = all_scores(f64("test.features"), f64("test.logits"))
    val = all_scores(f64("val.features"), f64("val.logits"))
    # Combination: z-scores against the ID validation scores (np.std, ddof 0).
    parts = [(f"vim(dim={VIM_DIM})", 0.7), ("knn(k=50)", 0.3)]
    calibration = {tag: {"mean": float(val[tag].mean()), "std": float(val[tag].std())} for tag, _ in parts}
    combined = sum(wt * (test[tag] - calibration[tag]["mean"]) / calibration[tag]["std"] for tag, wt in parts)
    combined_tag = "combined(" + "+".join(f"{wt}*{tag}" for tag, wt in parts) + ")"
    test[combined_tag] = combined

    tensors = dict(data)
    for name, v in stats.items():
        if name != "knn.bank":
            tensors[f"expected.stats.{name}"] = np.asarray(v, dtype=np.float64)
    for tag, v in test.items():
        tensors[f"expected.score.{tag}"] = v.astype(np.float64)
    is_id = data["test.is_id"]
    aurocs = {tag: float(auroc(v, is_id)) for tag, v in test.items()}
    metadata = {
        "description": __doc__.strip().splitlines()[0],
        "generator": "scripts/reference/detectors_ref.py",
        "numpy": np.__version__,
        "params": json.dumps({
            "K": K, "D": D, "n_train": N_TRAIN, "n_val": N_VAL, "seed": SEED,
            "knn_ks": KNN_KS, "vim_dim": VIM_DIM, "react_percentiles": REACT_PERCENTILES,
            "gen": [[g, min(m, K)] for g, m in GEN_PARAMS],
            "combination": {"tag": combined_tag, "parts": [[t, wt] for t, wt in parts],
                            "calibration": calibration},
            "auroc": aurocs,
        }),
    }
    write_safetensors(out_path, tensors, metadata)
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes)")
    print(f"train accuracy {float(stats['train_accuracy']):.3f}, vim alpha {float(stats['vim.alpha']):.6f}, "
          f"react clip {stats['react.clip']}")
    for tag, a in aurocs.items():
        print(f"  AUROC {tag:28s} {a:.4f}")


if __name__ == "__main__":
    main()
