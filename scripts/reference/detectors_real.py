#!/usr/bin/env python3
"""Independent NumPy / ONNX Runtime reference for every scoring method on
real images (used by tests/detectors_reference.rs).

It reads the exact 8-bit pixels the Rust side fitted on and scored (so JPEG
decoding is not compared), and does everything else itself:

* preprocessing: x = float32(p) * (1 / (255 std)) - mean / std, in float32
  (the card's normalisation, in the same two float32 roundings);
* the penultimate features: found by walking the ONNX graph from the logits
  to the final Gemm, whose input is added as a graph output, and run with the
  onnxruntime Python package;
* the ODIN-perturbed input: the derived graph G's `perturbed` output (the
  gradient itself is checked against PyTorch autograd elsewhere:
  tests/grad_reference.rs), then the model again on it;
* the fit statistics, from those features, by the direct formulas of
  scripts/reference/detectors_ref.py (OpenOOD v1.5's postprocessors);
* every score, in float64.

Usage: detectors_real.py JOB.json OUT.json, where JOB names the model, G,
the card's mean/std, the training pixels and labels, the test pixels, the
methods; OUT gets one list of scores per method label.
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import detectors_ref as ref  # noqa: E402


def session(model_bytes):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def final_gemm(model):
    """The Gemm that computes the first output, its input, W (K x D), b."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    node = producer[g.output[0].name]
    while node.op_type in ("Identity", "Softmax", "LogSoftmax"):
        node = producer[node.input[0]]
    assert node.op_type == "Gemm", node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    w = inits[node.input[1]].astype(np.float64) * attrs.get("alpha", 1.0)
    if not attrs.get("transB", 0):
        w = w.T
    b = inits[node.input[2]].astype(np.float64) * attrs.get("beta", 1.0)
    return node.input[0], w, b


def normalise(pixels, mean, std):
    """NHWC u8 -> NCHW float32, as the card says, in float32."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale = np.float32(1.0) / (np.float32(255.0) * std)
    shift = mean / std
    x = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    return x * scale[None, :, None, None] - shift[None, :, None, None]


class Model:
    def __init__(self, model_path, g_path):
        model = onnx.load(model_path)
        self.feature_name, self.w, self.b = final_gemm(model)
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(self.feature_name))
        self.plain = session(model.SerializeToString())
        self.input = self.plain.get_inputs()[0].name
        self.g = session(open(g_path, "rb").read())

    def forward(self, x, batch=128):
        logits, feats = [], []
        for i in range(0, len(x), batch):
            z, h = self.plain.run(None, {self.input: x[i:i + batch]})
            logits.append(z)
            feats.append(h.reshape(len(h), -1))
        return np.concatenate(logits), np.concatenate(feats)

    def perturb(self, x, t, eps, batch=128):
        out = []
        for i in range(0, len(x), batch):
            res = self.g.run(["perturbed"], {
                self.input: x[i:i + batch],
                "temperature": np.array([t], np.float32),
                "epsilon": np.array([eps], np.float32),
            })
            out.append(res[0])
        return np.concatenate(out)


def vim_dim(stats, h, z, dim, x_train, w, b):
    """ViM with principal dimension `dim` (detectors_ref.score_vim is fixed at its VIM_DIM)."""
    u = stats["vim.origin"]
    xc = x_train - u
    lam, vec = np.linalg.eigh(xc.T @ xc / len(x_train))
    ns = vec[:, np.argsort(-lam)[dim:]]
    alpha = (x_train @ w.T + b).max(axis=1).mean() / np.linalg.norm(xc @ ns, axis=1).mean()
    return -alpha * np.linalg.norm((h - u) @ ns, axis=1) + ref.logsumexp(z)


def main():
    job = json.load(open(sys.argv[1]))
    model = Model(job["model"], job["gradient_graph"])
    w, b = model.w, model.b
    ref.K = w.shape[0]

    def pixels(path, n, h, w_, c):
        return np.fromfile(path, np.uint8).reshape(n, h, w_, c)

    tr = job["train"]
    train_px = pixels(tr["pixels"], tr["n"], tr["h"], tr["w"], tr["c"])
    train_y = np.fromfile(tr["labels"], np.uint8).astype(np.int64)
    te = job["test"]
    test_px = pixels(te["pixels"], te["n"], te["h"], te["w"], te["c"])
    mean, std = job["mean"], job["std"]
    x_train = normalise(train_px, mean, std)
    x_test = normalise(test_px, mean, std)

    # Fit statistics: clean, and of training images perturbed at job["fit_perturbation"].
    fits = {}

    def fit(key, x):
        z, h = model.forward(x)
        h64 = h.astype(np.float64)
        ref.VIM_DIM = h.shape[1] // 2
        stats = ref.fit(h64, train_y, z.astype(np.float64), w, b)
        fits[key] = (stats, h64)

    fit("clean", x_train)
    fp = job.get("fit_perturbation")
    if fp:
        fit("perturbed", model.perturb(x_train, fp[0], fp[1]))

    # Test outputs, clean and per perturbation.
    outputs = {None: model.forward(x_test)}

    def outs(p):
        key = None if p is None else (float(p[0]), float(p[1]))
        if key not in outputs:
            outputs[key] = model.forward(model.perturb(x_test, key[0], key[1]))
        return outputs[key]

    def score(spec):
        m, params = spec["method"], spec.get("params", {})
        p = spec.get("perturb")
        z, h = outs(p)
        z, h = z.astype(np.float64), h.astype(np.float64)
        t = spec.get("temperature", 1.0)
        stats, h_train = fits[spec.get("stats", "clean")]
        if m in ("msp", "odin"):
            return ref.softmax(z / t).max(axis=1)
        if m == "energy":
            return t * ref.logsumexp(z / t)
        if m == "maxlogit":
            return z.max(axis=1)
        if m == "gen":
            return ref.score_gen(z, params.get("gamma", 0.1), min(params.get("M", 100), z.shape[1]))
        if m == "knn":
            return ref.score_knn(stats, h, params.get("k", 50))
        if m == "vim":
            return vim_dim(stats, h, z, params.get("dim", h.shape[1] // 2), h_train, w, b)
        if m == "mds":
            return ref.score_mds(stats, h)
        if m == "rmds":
            return ref.score_rmds(stats, h)
        if m == "react":
            ref.REACT_PERCENTILES = [params.get("p", 90.0)]
            stats = dict(stats)
            stats["react.clip"] = np.array([np.percentile(h_train.flatten(), params.get("p", 90.0))])
            return ref.score_react(stats, h, w, b, params.get("p", 90.0))
        if m == "fdbd":
            return ref.score_fdbd(stats, h, z, w, True)
        if m == "combined":
            total = 0.0
            for part in spec["parts"]:
                total = total + part["weight"] * (score(part) - part["mean"]) / part["std"]
            return total
        raise ValueError(m)

    result = {s["label"]: [float(v) for v in score(s)] for s in job["methods"]}
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
