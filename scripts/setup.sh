#!/usr/bin/env bash
# Installs what odin-sidecar needs at run time, inside the project folder only:
#   ONNX Runtime's shared library, unpacked from the pinned PyPI wheel into
#   .cache/onnxruntime/ (where the binary looks for it). `ort` cannot download
#   its own binaries here: its CDN is unreachable, as behind many firewalls.
# With --tests it also creates .venv-test/, the Python used by the tests'
# independent grpcio client, and .venv-ref/, the NumPy/ONNX Runtime reference
# of the detectors (--ref creates only that one). Idempotent: a second run
# does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.32.0
PYTHON=${PYTHON:-python3}
lib_dir=.cache/onnxruntime

if [ ! -f "$lib_dir/libonnxruntime.so.$ORT_VERSION" ]; then
  echo "setup: fetching onnxruntime==$ORT_VERSION from PyPI for libonnxruntime.so" >&2
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    "onnxruntime==$ORT_VERSION" -d .cache/wheels
  "$PYTHON" - "$lib_dir" .cache/wheels/onnxruntime-"$ORT_VERSION"-*.whl <<'PY'
import os, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
            print(f"setup: unpacked {base} into {dest}", file=sys.stderr)
PY
fi

if [ "${1:-}" = "--tests" ] || [ "${1:-}" = "--ref" ]; then
  if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import numpy, onnx, onnxruntime" 2>/dev/null; then
    echo "setup: creating .venv-ref with numpy, onnx and onnxruntime for the detectors' reference test" >&2
    "$PYTHON" -m venv .venv-ref
    .venv-ref/bin/python -m pip install --quiet -r scripts/requirements-ref.txt
  fi
fi

if [ "${1:-}" = "--tests" ]; then
  if [ ! -x .venv-test/bin/python ] || ! .venv-test/bin/python -c "import grpc, grpc_reflection" 2>/dev/null; then
    echo "setup: creating .venv-test with grpcio for the independent-client test" >&2
    "$PYTHON" -m venv .venv-test
    .venv-test/bin/python -m pip install --quiet -r scripts/requirements-test.txt
  fi
fi
