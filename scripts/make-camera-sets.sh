#!/usr/bin/env bash
# Makes the camera-size test sets of the README's fidelity table (never
# committed): CIFAR-10 test and TinyImageNet crops, every image upscaled
# (bicubic) to 640x480 and 1920x1080 and JPEG-encoded at q85, 4:2:0, as
# packed sets in .cache/camera/ (git-ignored):
#   cifar10_test_640x480_q85.jpgpack   (+ .offsets.u64, .labels.u8, .json)
#   cifar10_test_1920x1080_q85.jpgpack
#   tin_crop_640x480_q85.jpgpack
#   tin_crop_1920x1080_q85.jpgpack
# About 2.2 GB in all and ~10 minutes on 2 cores.
#
# Usage: scripts/make-camera-sets.sh [--first N] [extra make-camera-sets.py flags]
#   env ODIN_DATA  data directory (default: <repo root>/../shared/data)
#   env PYTHON     interpreter used to create the venv (default: python3)
# Idempotent: reuses .venv-camera and skips sets that already exist.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-camera"
REQ="$ROOT/scripts/requirements-camera.txt"
DATA="${ODIN_DATA:-$ROOT/../shared/data}"
OUT="$ROOT/.cache/camera"
cd "$ROOT"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import PIL, numpy" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
fi

jobs=()
for src in cifar10_test tin_crop; do
    for size in 640x480 1920x1080; do
        name="${src}_${size}_q85"
        if [[ -f "$OUT/$name.jpgpack" && -f "$OUT/$name.json" ]]; then
            echo "$name: already there" >&2
            continue
        fi
        "$VENV/bin/python" scripts/make-camera-sets.py --src "$DATA/$src.u8" --size "$size" \
            --quality 85 --subsampling 4:2:0 --out "$OUT" --name "$name" "$@" &
        jobs+=($!)
        # One set per core.
        if (( ${#jobs[@]} >= $(nproc) )); then
            wait "${jobs[0]}"
            jobs=("${jobs[@]:1}")
        fi
    done
done
for job in "${jobs[@]}"; do wait "$job"; done
ls -la "$OUT"/*.jpgpack >&2
