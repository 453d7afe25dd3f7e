# shellcheck shell=bash
# Shared by scripts/validate-deploy.sh and scripts/container-test.sh; sourced
# from the repository root, not run.
#
# VENV (.venv-deploy) holds the pinned tools of scripts/requirements-deploy.txt.
# ensure_venv creates or updates it only when that file (or the Python)
# changed since the last install, so later runs cost nothing.

VENV=${VENV:-.venv-deploy}
DEPLOY_REQUIREMENTS=scripts/requirements-deploy.txt
PYTHON=${PYTHON:-python3}

failures=0

now() { date +%s.%N; }
# seconds since $1, one decimal
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
info() { printf '      %s\n' "$*"; }

# Installs Debian packages that are missing (root only), quietly.
apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "need root to apt-get install $*" >&2
    return 1
  fi
  info "apt-get install $*"
  local log
  log=$(mktemp)
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >"$log" 2>&1; then
    tail -20 "$log"
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}

ensure_venv() {
  local want have
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install python3-venv
  fi
  want="$(sha256sum "$DEPLOY_REQUIREMENTS" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
  have="$(cat "$VENV/.installed" 2>/dev/null || true)"
  if [ -x "$VENV/bin/python" ] && [ "$want" = "$have" ]; then
    return 0
  fi
  info "installing $DEPLOY_REQUIREMENTS into $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$DEPLOY_REQUIREMENTS"
  echo "$want" > "$VENV/.installed"
}
