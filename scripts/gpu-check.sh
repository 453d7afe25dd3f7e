#!/usr/bin/env bash
# CUDA readiness check, for a machine with an NVIDIA GPU:
#   1. installs the onnxruntime-gpu library (the pinned PyPI wheel, unpacked
#      into .cache/onnxruntime-gpu/; nothing outside the project folder), and
#      the CUDA 13 / cuDNN 9 runtime wheels into .venv-gpu/ when the system
#      has no cuDNN 9;
#   2. builds the release binary and runs the CUDA tests (tests/cuda.rs:
#      the fused graph and the two-session path on CUDA, against each other
#      and against the CPU; a server on --device cuda scoring every method);
#   3. runs `bench engine --device cuda` on ResNet-20 (with its fit
#      statistics when results-work/resnet20.fit.safetensors exists) and
#      prints the table.
# Usage: scripts/gpu-check.sh [extra `bench engine` flags]
# Without a GPU it says so and exits 2. (Written and checked for syntax on a
# machine without a GPU; see the README's known limitations.)
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
PYTHON=${PYTHON:-python3}
DATA=${ODIN_DATA:-../shared/data}
lib_dir=.cache/onnxruntime-gpu

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi is missing or fails): nothing to check" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

# 1. The libraries.
if [ ! -f "$lib_dir/libonnxruntime.so.$ORT_GPU_VERSION" ]; then
  echo "gpu-check: fetching onnxruntime-gpu==$ORT_GPU_VERSION from PyPI" >&2
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    "onnxruntime-gpu==$ORT_GPU_VERSION" -d .cache/wheels
  "$PYTHON" - "$lib_dir" .cache/wheels/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl <<'PY'
import os, sys, zipfile
dest, wheel = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
            with z.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
            print(f"gpu-check: unpacked {base} into {dest}", file=sys.stderr)
PY
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libcudnn.so.9'; then
  if [ ! -x .venv-gpu/bin/python ]; then
    echo "gpu-check: no system cuDNN 9: installing the CUDA and cuDNN runtime wheels into .venv-gpu" >&2
    "$PYTHON" -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install --quiet "onnxruntime-gpu[cuda,cudnn]==$ORT_GPU_VERSION"
  fi
  nvidia_libs=$(.venv-gpu/bin/python -c "import glob, os, site; print(':'.join(sorted(set(os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/*/lib/*.so*')))))")
  export LD_LIBRARY_PATH="$nvidia_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export ORT_DYLIB_PATH="$PWD/$lib_dir/libonnxruntime.so.$ORT_GPU_VERSION"
export ODIN_CUDA=1

# 2. The CUDA tests.
cargo build --release --locked
cargo test --release --locked --test cuda -- --nocapture --test-threads=1

# 3. The engine benchmark on CUDA.
stats=()
if [ -f results-work/resnet20.fit.safetensors ]; then
  stats=(--fit-stats results-work/resnet20.fit.safetensors)
fi
echo
echo "bench engine --device cuda (ResNet-20):"
"${CARGO_TARGET_DIR:-target}"/release/odin-sidecar bench engine --device cuda \
  --model "$DATA/models/resnet20_cifar10.onnx" --card models/resnet20_cifar10.card.json \
  "${stats[@]}" "$@"
