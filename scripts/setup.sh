#!/usr/bin/env bash
# Installs what odin-sidecar needs at run time, inside the project folder only:
#   ONNX Runtime's shared library, unpacked from the pinned PyPI wheel into
#   .cache/onnxruntime/ (where the binary looks for it). `ort` cannot download
#   its own binaries here: its CDN is unreachable, as behind many firewalls.
#   libjpeg-turbo's TurboJPEG library (Debian/Ubuntu: libturbojpeg0-dev), the
#   fast JPEG decoder of camera frames, installed with apt-get when it is
#   missing and this user can (root, or sudo without a password). Without it
#   the build still succeeds and decodes JPEG with a pure-Rust fallback,
#   about 2x slower; the server says so at start-up.
# With --tests it also creates .venv-test/, the Python used by the tests'
# independent clients (grpcio with reflection, NVIDIA's tritonclient), and
# reinstalls the pins into an existing one that lacks any of them; and
# .venv-ref/, the NumPy/ONNX Runtime reference of the detectors (--ref
# creates only that one). Idempotent: a second run does nothing.
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

# libjpeg-turbo: crates/tjdecode/build.rs links it when it finds it.
have_turbojpeg() {
  for dir in /usr/lib/*-linux-gnu /usr/lib64 /usr/local/lib /usr/lib; do
    [ -e "$dir/libturbojpeg.so" ] && return 0
  done
  command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libturbojpeg 2>/dev/null
}
if ! have_turbojpeg; then
  if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      sudo=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      sudo="none"
    fi
    if [ "$sudo" != none ]; then
      echo "setup: installing libturbojpeg0-dev (libjpeg-turbo) with apt-get" >&2
      if $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libturbojpeg0-dev >&2 \
        || { $sudo apt-get update >&2 && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libturbojpeg0-dev >&2; }; then
        # The build script detected its absence before: make it look again.
        touch crates/tjdecode/build.rs
      else
        echo "setup: could not install libturbojpeg0-dev; JPEG decoding will use the slower pure-Rust fallback" >&2
      fi
    else
      echo "setup: libturbojpeg0-dev is missing and this user cannot apt-get install it (not root, no passwordless sudo);" \
           "building with the slower pure-Rust JPEG fallback" >&2
    fi
  else
    echo "setup: libjpeg-turbo (TurboJPEG 2.x) not found and no apt-get here: install it with your package manager" \
         "(or set TURBOJPEG_LIB_DIR) for fast JPEG decoding; building with the pure-Rust fallback" >&2
  fi
fi

if [ "${1:-}" = "--tests" ] || [ "${1:-}" = "--ref" ]; then
  if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import numpy, onnx, onnxruntime" 2>/dev/null; then
    echo "setup: creating .venv-ref with numpy, onnx and onnxruntime for the detectors' reference test" >&2
    "$PYTHON" -m venv .venv-ref
    .venv-ref/bin/python -m pip install --quiet -r scripts/requirements-ref.txt
  fi
fi

if [ "${1:-}" = "--tests" ]; then
  if [ ! -x .venv-test/bin/python ] || [ ! -x .venv-test/bin/grpcurl ] \
    || ! .venv-test/bin/python -c "import grpc, grpc_reflection, tritonclient.grpc" 2>/dev/null; then
    echo "setup: creating .venv-test with grpcio, tritonclient and grpcurl for the client tests" >&2
    "$PYTHON" -m venv .venv-test
    .venv-test/bin/python -m pip install --quiet -r scripts/requirements-test.txt
  fi
fi
