#!/usr/bin/env python3
"""Train the default CIFAR-10 classifier shipped with odin-sidecar and export it to ONNX.

Run through `bash scripts/train-default-model.sh` (creates .venv-train with the pinned
requirements). Everything runs on CPU with JAX; no optax/flax.

Outputs (relative to the repository root):
  models/cifar10_cnn.onnx       the model (Conv/Relu/GlobalAveragePool/Flatten/Gemm only)
  models/cifar10_cnn.card.json  the model card parsed by the Rust service
  .cache/train-default-model/params.npz   trained weights (gitignored; for --export-only)

Data: $ODIN_DATA if set, else <repo root>/../shared/data (read-only, never copied).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
CACHE = REPO / ".cache" / "train-default-model"
ONNX_PATH = MODELS / "cifar10_cnn.onnx"
CARD_PATH = MODELS / "cifar10_cnn.card.json"

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# (out_channels, stride) per 3x3 conv, all with padding 1; input has 3 channels.
ARCH = [(32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]
# Per layer: compute the conv as im2col + matmul (True) or XLA's native conv (False) during training.
# Same math either way; chosen by timing fwd+bwd on a 2-core x86 CPU.
IM2COL = [True, True, True, True, False]
NUM_CLASSES = 10
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # running = m * running + (1 - m) * batch

# Training recipe (defaults are what produced the committed model).
SEED = 0
EPOCHS = 9
BATCH = 128
PEAK_LR = 0.2
WARMUP_FRAC = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def data_dir() -> Path:
    env = os.environ.get("ODIN_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data

def load_train(d: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    pack = (d / "cifar10_train.jpgpack").read_bytes()
    off = np.fromfile(d / "cifar10_train.offsets.u64", dtype="<u8")
    labels = np.fromfile(d / "cifar10_train.labels.u8", dtype=np.uint8)
    n = len(labels)
    assert len(off) == n + 1 and off[-1] == len(pack), "offsets do not match the pack"
    x = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        with Image.open(io.BytesIO(pack[off[i]:off[i + 1]])) as im:
            x[i] = np.asarray(im.convert("RGB"))
    return x, labels.astype(np.int32)


def load_test(d: Path) -> tuple[np.ndarray, np.ndarray]:
    x = np.fromfile(d / "cifar10_test.u8", dtype=np.uint8).reshape(-1, 32, 32, 3)
    y = np.fromfile(d / "cifar10_test.labels.u8", dtype=np.uint8).astype(np.int32)
    assert len(x) == len(y) == 10000
    return x, y


def normalize_nchw(u8_nhwc: np.ndarray) -> np.ndarray:
    """u8 NHWC RGB -> float32 NCHW, (x/255 - mean)/std. Exactly what the service feeds ONNX."""
    x = u8_nhwc.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class Augmenter:
    """Random 32x32 crop from the 4-px zero-padded image + random horizontal flip (numpy, seeded)."""

    def __init__(self, x: np.ndarray, rng: np.random.Generator):
        self.padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
        self.rng = rng
        self.ar = np.arange(32)

    def batch(self, idx: np.ndarray) -> np.ndarray:
        b = len(idx)
        oy = self.rng.integers(0, 9, size=b)
        ox = self.rng.integers(0, 9, size=b)
        flip = self.rng.random(b) < 0.5
        rows = oy[:, None] + self.ar
        cols = np.where(flip[:, None], ox[:, None] + 31 - self.ar, ox[:, None] + self.ar)
        return self.padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


# ----------------------------------------------------------------------------- model (JAX)

def init_params(key):
    import jax
    import jax.numpy as jnp

    params, state = {"conv": [], "fc": {}}, {"bn": []}
    cin = 3
    for cout, _ in ARCH:
        key, k = jax.random.split(key)
        std = np.sqrt(2.0 / (9 * cin))  # He normal, fan_in
        params["conv"].append({
            "w": jax.random.normal(k, (3, 3, cin, cout), jnp.float32) * std,  # HWIO
            "gamma": jnp.ones((cout,), jnp.float32),
            "beta": jnp.zeros((cout,), jnp.float32),
        })
        state["bn"].append({"mean": jnp.zeros((cout,), jnp.float32), "var": jnp.ones((cout,), jnp.float32)})
        cin = cout
    key, k = jax.random.split(key)
    bound = 1.0 / np.sqrt(cin)
    params["fc"] = {
        "w": jax.random.uniform(k, (cin, NUM_CLASSES), jnp.float32, -bound, bound),
        "b": jnp.zeros((NUM_CLASSES,), jnp.float32),
    }
    return params, state


def conv(x, w, stride, im2col: bool):
    """3x3 conv, padding 1, NHWC x HWIO. Two mathematically identical implementations:
    XLA's native convolution, or explicit im2col + one matmul. On XLA:CPU the im2col form has a much
    faster backward pass (weight gradient = one large GEMM) for the early, large-spatial layers."""
    import jax
    import jax.numpy as jnp

    if not im2col:
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    b, h, wd, c = x.shape
    ho, wo = h // stride, wd // stride
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [xp[:, dy:dy + (ho - 1) * stride + 1:stride, dx:dx + (wo - 1) * stride + 1:stride, :]
            for dy in range(3) for dx in range(3)]  # (dy, dx, cin) order == HWIO reshape order
    patches = jnp.concatenate(taps, axis=-1).reshape(b * ho * wo, 9 * c)
    return (patches @ w.reshape(9 * c, -1)).reshape(b, ho, wo, -1)


def forward(params, state, x, train: bool):
    """x: float32 NHWC normalised. Returns (logits, new_state)."""
    import jax
    import jax.numpy as jnp

    new_bn = []
    for layer, bn, (_, stride), im2col in zip(params["conv"], state["bn"], ARCH, IM2COL):
        y = conv(x, layer["w"], stride, im2col)
        if train:
            mean = jnp.mean(y, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 2))
            m = BN_MOMENTUM
            n = y.shape[0] * y.shape[1] * y.shape[2]
            new_bn.append({"mean": m * bn["mean"] + (1 - m) * mean,
                           "var": m * bn["var"] + (1 - m) * var * (n / (n - 1))})
        else:
            mean, var = bn["mean"], bn["var"]
            new_bn.append(bn)
        y = (y - mean) * (layer["gamma"] * jax.lax.rsqrt(var + BN_EPS)) + layer["beta"]
        x = jax.nn.relu(y)
    x = jnp.mean(x, axis=(1, 2))
    return x @ params["fc"]["w"] + params["fc"]["b"], {"bn": new_bn}


def forward_folded(folded, x_nchw):
    """The exported graph, in JAX: Conv(+bias)/Relu x5, GlobalAveragePool, Gemm. x: NCHW."""
    import jax
    import jax.numpy as jnp

    for (w, b), (_, stride) in zip(folded["conv"], ARCH):
        y = jax.lax.conv_general_dilated(
            x_nchw, w, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"))
        x_nchw = jax.nn.relu(y + b[None, :, None, None])
    x = jnp.mean(x_nchw, axis=(2, 3))
    return x @ folded["fc_w"].T + folded["fc_b"]


def normalize_jax(u8_nhwc):
    import jax.numpy as jnp

    x = u8_nhwc.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


# ----------------------------------------------------------------------------- optimizer

def sgd_nesterov_init(params):
    import jax
    import jax.numpy as jnp

    return jax.tree_util.tree_map(jnp.zeros_like, params)


def sgd_nesterov_update(params, grads, velocity, lr, momentum, weight_decay):
    """SGD with Nesterov momentum; L2 weight decay on conv/fc weights only (not BN, not bias)."""
    import jax

    def decay_mask(path, _):
        return path[-1].key == "w"

    wd = jax.tree_util.tree_map_with_path(lambda p, x: weight_decay if decay_mask(p, x) else 0.0, params)
    grads = jax.tree_util.tree_map(lambda g, p, d: g + d * p, grads, params, wd)
    velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
    step = jax.tree_util.tree_map(lambda g, v: g + momentum * v, grads, velocity)
    params = jax.tree_util.tree_map(lambda p, s: p - lr * s, params, step)
    return params, velocity


def lr_at(step: int, total: int) -> float:
    """One-cycle, piecewise linear: 0 -> PEAK_LR over WARMUP_FRAC of training, then -> 0."""
    warm = max(1, int(WARMUP_FRAC * total))
    if step < warm:
        return PEAK_LR * (step + 1) / warm
    return PEAK_LR * max(0.0, (total - step) / (total - warm))


# ----------------------------------------------------------------------------- training

def make_train_step():
    import jax
    import jax.numpy as jnp

    def loss_fn(params, state, xb_u8, yb):
        logits, new_state = forward(params, state, normalize_jax(xb_u8), train=True)
        logp = jax.nn.log_softmax(logits)
        loss = -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))
        acc = jnp.mean(jnp.argmax(logits, axis=1) == yb)
        return loss, (new_state, acc)

    @jax.jit
    def step(params, state, velocity, xb_u8, yb, lr):
        (loss, (new_state, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, xb_u8, yb)
        params, velocity = sgd_nesterov_update(params, grads, velocity, lr, MOMENTUM, WEIGHT_DECAY)
        return params, new_state, velocity, loss, acc

    return step


def eval_logits_jax(params, state, u8_nhwc, batch=500):
    import jax

    f = jax.jit(lambda p, s, xb: forward(p, s, normalize_jax(xb), train=False)[0])
    return np.concatenate([np.asarray(f(params, state, u8_nhwc[i:i + batch]))
                           for i in range(0, len(u8_nhwc), batch)])


def train(args, x_train, y_train):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(args.seed)
    params, state = init_params(jax.random.PRNGKey(args.seed))
    velocity = sgd_nesterov_init(params)
    aug = Augmenter(x_train, rng)
    step_fn = make_train_step()

    n = len(x_train)
    steps_per_epoch = n // BATCH
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    total = steps_per_epoch * args.epochs
    log(f"training: {args.epochs} epochs x {steps_per_epoch} steps, batch {BATCH}, peak lr {PEAK_LR}")

    t0 = time.perf_counter()
    gstep = 0
    for epoch in range(args.epochs):
        te = time.perf_counter()
        perm = rng.permutation(n)
        losses, accs = [], []
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH:(s + 1) * BATCH]
            xb = aug.batch(idx)
            yb = y_train[idx]
            lr = jnp.float32(lr_at(gstep, total))
            params, state, velocity, loss, acc = step_fn(params, state, velocity, xb, yb, lr)
            losses.append(loss)
            accs.append(acc)
            gstep += 1
            if args.max_steps and s == 0:
                jax.block_until_ready(loss)
                log(f"  first step (incl. compile) {time.perf_counter() - te:.1f}s")
                te2 = time.perf_counter()
        jax.block_until_ready(params)
        dt = time.perf_counter() - te
        msg = (f"epoch {epoch + 1}/{args.epochs}: loss {float(np.mean(jnp.stack(losses))):.4f} "
               f"train-acc {float(np.mean(jnp.stack(accs))):.4f}  {dt:.1f}s "
               f"(total {time.perf_counter() - t0:.1f}s)")
        if args.max_steps:
            per = (time.perf_counter() - te2) / max(1, steps_per_epoch - 1)
            msg += f"  steady {per * 1000:.0f} ms/step -> {per * (n // BATCH):.0f} s/full epoch"
        log(msg)
    train_s = time.perf_counter() - t0
    return params, state, train_s


# ----------------------------------------------------------------------------- export

def fold(params, state) -> dict:
    """Fold eval-mode BatchNorm into conv weight/bias; convert to ONNX layouts (OIHW, [out,in])."""
    conv = []
    for layer, bn in zip(params["conv"], state["bn"]):
        w = np.asarray(layer["w"], np.float64)  # HWIO
        scale = np.asarray(layer["gamma"], np.float64) / np.sqrt(np.asarray(bn["var"], np.float64) + BN_EPS)
        b = np.asarray(layer["beta"], np.float64) - np.asarray(bn["mean"], np.float64) * scale
        w = (w * scale).transpose(3, 2, 0, 1)  # OIHW
        conv.append((np.ascontiguousarray(w, np.float32), b.astype(np.float32)))
    return {"conv": conv,
            "fc_w": np.ascontiguousarray(np.asarray(params["fc"]["w"]).T, np.float32),  # [10, C]
            "fc_b": np.asarray(params["fc"]["b"], np.float32)}


def build_onnx(folded):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    cur = "input"
    for i, ((w, b), (_, stride)) in enumerate(zip(folded["conv"], ARCH)):
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes.append(helper.make_node(
            "Conv", [cur, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"conv{i}",
            kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride], dilations=[1, 1], group=1))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        cur = f"relu{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits += [numpy_helper.from_array(folded["fc_w"], "fc.weight"), numpy_helper.from_array(folded["fc_b"], "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc",
                                  alpha=1.0, beta=1.0, transA=0, transB=1))
    graph = helper.make_graph(
        nodes, "cifar10_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="odin-sidecar scripts/train_default_model.py", producer_version="1")
    model.ir_version = 8
    model.doc_string = ("CIFAR-10 all-conv CNN. input: float32 [N,3,32,32] RGB, (u8/255-mean)/std; "
                        "output: raw logits [N,10].")
    onnx.checker.check_model(model, full_check=True)
    return model


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    h.update(path.read_bytes())
    return h.hexdigest()


def export_and_verify(args, params, state, x_test, y_test, train_info: dict) -> None:
    import jax
    import onnx
    import onnxruntime as ort

    folded = fold(params, state)
    model = build_onnx(folded)
    MODELS.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(ONNX_PATH))
    size = ONNX_PATH.stat().st_size
    log(f"wrote {ONNX_PATH.relative_to(REPO)} ({size} bytes)")
    assert size <= 3 * 1024 * 1024, "model larger than 3 MB"

    # Re-load from disk and re-check exactly what ships.
    loaded = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(loaded, full_check=True)
    ops = sorted({n.op_type for n in loaded.graph.node})
    assert set(ops) <= {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}, ops
    assert all(o.domain in ("", "ai.onnx") for o in loaded.opset_import)
    assert loaded.ir_version == 8 and loaded.opset_import[0].version == 17

    sess = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    x_all = normalize_nchw(x_test)

    # JAX vs ORT on the first 256 test images (batch 256 and batch 1).
    x256 = x_all[:256]
    ort256 = sess.run(["logits"], {"input": x256})[0]
    jax_bn = eval_logits_jax(params, state, x_test[:256], batch=256)  # trained graph, BN eval mode
    jax_fold = np.asarray(jax.jit(forward_folded)(jax.tree_util.tree_map(np.asarray, folded), x256))
    ort_b1 = np.concatenate([sess.run(["logits"], {"input": x256[i:i + 1]})[0] for i in range(256)])
    d_bn = float(np.max(np.abs(ort256 - jax_bn)))
    d_fold = float(np.max(np.abs(ort256 - jax_fold)))
    d_b1 = float(np.max(np.abs(ort_b1 - ort256)))
    log(f"max |logit(ORT) - logit(JAX, BN eval)| = {d_bn:.3e}; vs JAX folded graph = {d_fold:.3e}; "
        f"ORT batch1 vs batch256 = {d_b1:.3e}  (max |logit| {float(np.max(np.abs(ort256))):.2f})")
    assert d_bn <= 1e-4 and d_fold <= 1e-4 and d_b1 <= 1e-4, "ONNX does not match JAX"

    # Accuracy on all 10,000 JPEG-q75 test images through ORT.
    preds = np.concatenate([np.argmax(sess.run(["logits"], {"input": x_all[i:i + 1000]})[0], axis=1)
                            for i in range(0, len(x_all), 1000)])
    acc = float(np.mean(preds == y_test))
    per_class = [float(np.mean(preds[y_test == c] == c)) for c in range(NUM_CLASSES)]
    jax_acc = float(np.mean(np.argmax(eval_logits_jax(params, state, x_test), axis=1) == y_test))
    log(f"test accuracy (ORT, cifar10_test.u8): {acc:.4f}   (JAX: {jax_acc:.4f})")
    log("per-class: " + ", ".join(f"{LABELS[c]} {per_class[c]:.3f}" for c in range(NUM_CLASSES)))

    n_params = sum(int(np.prod(t.dims)) for t in loaded.graph.initializer)
    card = {
        "name": "cifar10_cnn",
        "version": "1",
        # "area": measured on camera-size CIFAR-10 frames (README, Camera-size frames).
        "input": {"height": 32, "width": 32, "channels": 3, "channel_order": "RGB", "resize": "area",
                  "mean": list(MEAN), "std": list(STD)},
        "labels": LABELS,
        "odin": {"temperature": 1000.0, "epsilon": 0.0014},
        "provenance": {
            "trained_by": "scripts/train-default-model.sh",
            "script": "scripts/train_default_model.py",
            "dataset": "CIFAR-10 train, 50,000 JPEG q75 images from shared/data/cifar10_train.jpgpack",
            "architecture": ("Conv3x3(3->32)+ReLU, Conv3x3/s2(32->64)+ReLU, Conv3x3(64->64)+ReLU, "
                             "Conv3x3/s2(64->128)+ReLU, Conv3x3(128->128)+ReLU, GlobalAveragePool, "
                             "Flatten, Gemm(128->10); BatchNorm after every conv during training, "
                             "folded into conv weight/bias at export"),
            "parameters": n_params,
            "onnx_ops": ops,
            "opset": 17,
            "ir_version": 8,
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": BATCH,
            "optimizer": (f"SGD, Nesterov momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} (conv/fc weights), "
                          f"one-cycle linear LR 0 -> {PEAK_LR} over first {int(WARMUP_FRAC * 100)}% of "
                          f"steps -> 0; cross-entropy loss"),
            "augmentation": "random 32x32 crop from 4-px zero-padded image + random horizontal flip (p=0.5)",
            "training_wall_time_s": round(train_info["train_s"], 1),
            "training_wall_time_note": ("training loop only (excludes JPEG decode, export and evaluation); "
                                        "depends on CPU load from other processes"),
            "training_hardware": train_info["hardware"],
            "accuracy_cifar10_test_u8": round(acc, 4),
            "accuracy_note": ("measured through onnxruntime 1.32.0 on shared/data/cifar10_test.u8 "
                              "(JPEG q75 copy of the test set)"),
            "max_abs_logit_diff_jax_vs_onnxruntime_256": float(f"{max(d_bn, d_fold):.3e}"),
            "versions": train_info["versions"],
            "sha256": sha256(ONNX_PATH),
        },
    }
    CARD_PATH.write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {CARD_PATH.relative_to(REPO)}")


# ----------------------------------------------------------------------------- main

def versions() -> dict:
    import jax
    import jaxlib
    import onnx
    import onnxruntime
    import PIL

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--max-steps", type=int, default=0,
                    help="debug/benchmark: limit steps per epoch and print step timing")
    ap.add_argument("--no-export", action="store_true", help="train only; write nothing")
    ap.add_argument("--export-only", action="store_true",
                    help="re-export from .cache/train-default-model/params.npz without training")
    args = ap.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    d = data_dir()
    log(f"data: {d}; jax {jax.__version__} devices {jax.devices()}; cpu count {os.cpu_count()}")
    x_test, y_test = load_test(d)
    ckpt = CACHE / "params.npz"

    if args.export_only:
        z = np.load(ckpt, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        params, state = init_params(jax.random.PRNGKey(0))
        flat_p, tdef_p = jax.tree_util.tree_flatten(params)
        flat_s, tdef_s = jax.tree_util.tree_flatten(state)
        params = jax.tree_util.tree_unflatten(tdef_p, [z[f"p{i}"] for i in range(len(flat_p))])
        state = jax.tree_util.tree_unflatten(tdef_s, [z[f"s{i}"] for i in range(len(flat_s))])
        args.seed, args.epochs = meta["seed"], meta["epochs"]
        export_and_verify(args, params, state, x_test, y_test, meta)
        return 0

    t = time.perf_counter()
    x_train, y_train = load_train(d)
    log(f"decoded {len(x_train)} train JPEGs in {time.perf_counter() - t:.1f}s; "
        f"pixel means {x_train.reshape(-1, 3).mean(0).round(1).tolist()}")

    params, state, train_s = train(args, x_train, y_train)
    log(f"training wall time {train_s:.1f}s ({train_s / 60:.1f} min)")
    if args.no_export:
        return 0

    meta = {"seed": args.seed, "epochs": args.epochs, "train_s": train_s, "versions": versions(),
            "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores, JAX CPU backend"}
    CACHE.mkdir(parents=True, exist_ok=True)
    flat_p = jax.tree_util.tree_leaves(params)
    flat_s = jax.tree_util.tree_leaves(state)
    np.savez(ckpt, meta=json.dumps(meta), **{f"p{i}": np.asarray(a) for i, a in enumerate(flat_p)},
             **{f"s{i}": np.asarray(a) for i, a in enumerate(flat_s)})
    export_and_verify(args, params, state, x_test, y_test, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
