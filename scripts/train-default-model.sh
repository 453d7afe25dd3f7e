#!/usr/bin/env bash
# Train the default CIFAR-10 model from scratch on CPU and export it to ONNX:
#   models/cifar10_cnn.onnx + models/cifar10_cnn.card.json
#
# Usage: bash scripts/train-default-model.sh [extra args for scripts/train_default_model.py]
#   env ODIN_DATA  data directory (default: <repo root>/../shared/data)
#   env PYTHON     interpreter used to create the venv (default: python3; needs >= 3.11)
#
# Idempotent: reuses .venv-train (gitignored) and only installs what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-train"
REQ="$ROOT/scripts/requirements-train.txt"
PY="${PYTHON:-python3}"

cd "$ROOT"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
fi

# Re-run pip only when the requirements changed since the last successful install.
STAMP="$VENV/.requirements-train.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQ"
    echo "$want" > "$STAMP"
fi

exec "$VENV/bin/python" "$ROOT/scripts/train_default_model.py" "$@"
