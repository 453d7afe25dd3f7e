#!/usr/bin/env bash
# The fidelity table of the README ("Camera-size frames"): accuracy and ODIN
# AUROC (TinyImageNet crops as OOD, images 1000-9999, each model at its
# calibrated T and epsilon) of the built-in CNN and ResNet-20 on
#   the 32x32 originals, and
#   the camera-size sets of scripts/make-camera-sets.sh (640x480, 1920x1080,
#   JPEG q85), through the old full-decode path (--decode legacy --resize
#   bilinear), the new path with each filter, and the full decode with the
#   exact area average.
# Prints the markdown table; each run's eval.md/eval.json stays in
# .cache/fidelity/<run>/ (a run already there is not repeated).
# About 30 minutes on 2 cores; needs ../shared/data (or ODIN_DATA) and the sets.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${ODIN_DATA:-$ROOT/../shared/data}"
SETS=.cache/camera
OUT=.cache/fidelity
cargo build --release --quiet
BIN=target/release/odin-sidecar
mkdir -p "$OUT"

run() { # name, eval flags...
    local name=$1; shift
    [[ -f "$OUT/$name/eval.json" ]] && return
    echo "eval $name" >&2
    "$BIN" eval --device cpu --threads 2 --method-spec calibrated --out-dir "$OUT/$name" "$@" \
        > "$OUT/$name.log" 2>&1 || { cat "$OUT/$name.log" >&2; exit 1; }
}

for model in cnn r20; do
    if [[ $model == cnn ]]; then
        flags=(--calibration models/cifar10_cnn.calibration.json)
    else
        flags=(--model "$DATA/models/resnet20_cifar10.onnx" --card models/resnet20_cifar10.card.json
               --calibration models/resnet20_cifar10.calibration.json)
    fi
    run "$model-32" "${flags[@]}" --id "$DATA/cifar10_test.u8" --ood "$DATA/tin_crop.u8"
    for size in 640x480 1920x1080; do
        sets=(--id "$SETS/cifar10_test_${size}_q85.jpgpack" --ood "$SETS/tin_crop_${size}_q85.jpgpack")
        for f in "$SETS/cifar10_test_${size}_q85.jpgpack" "$SETS/tin_crop_${size}_q85.jpgpack"; do
            [[ -f $f ]] || { echo "$f missing: run scripts/make-camera-sets.sh" >&2; exit 1; }
        done
        run "$model-$size-legacy-bilinear" "${flags[@]}" "${sets[@]}" --decode legacy --resize bilinear
        run "$model-$size-fast-bilinear" "${flags[@]}" "${sets[@]}" --resize bilinear
        run "$model-$size-fast-area" "${flags[@]}" "${sets[@]}" --resize area
        run "$model-$size-legacy-area" "${flags[@]}" "${sets[@]}" --decode legacy --resize area
    done
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def get(name):
    j = json.load(open(os.path.join(out, name, "eval.json")))
    r = j["results"][0]
    return j["accuracy"] * 100, r["auroc"] * 100, r["fpr_at_tpr"] * 100
models = {"cnn": "built-in CNN", "r20": "ResNet-20"}
paths = [
    ("legacy-bilinear", "old: full decode + f32 Triangle", "bilinear"),
    ("fast-bilinear", "new: DCT-scaled decode + integer bilinear", "bilinear"),
    ("fast-area", "new: DCT-scaled decode + area", "area"),
    ("legacy-area", "reference: full decode + exact area", "area"),
]
print("| model | frames | decode path | resize | accuracy | Δ vs old | ODIN AUROC | Δ vs old | FPR at 95% TPR |")
print("|---|---|---|---|---|---|---|---|---|")
for m, label in models.items():
    acc, auroc, fpr = get(f"{m}-32")
    print(f"| {label} | 32×32 originals | — | — | {acc:.2f}% | | {auroc:.2f}% | | {fpr:.1f}% |")
    for size in ("640x480", "1920x1080"):
        old = get(f"{m}-{size}-legacy-bilinear")
        for key, desc, resize in paths:
            acc, auroc, fpr = get(f"{m}-{size}-{key}")
            da = "" if key == "legacy-bilinear" else f"{acc - old[0]:+.2f}"
            du = "" if key == "legacy-bilinear" else f"{auroc - old[1]:+.2f}"
            frames = size.replace("x", "×") + " q85"
            print(f"| {label} | {frames} | {desc} | `{resize}` | {acc:.2f}% | {da} | {auroc:.2f}% | {du} | {fpr:.1f}% |")
PY
