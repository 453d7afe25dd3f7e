#!/usr/bin/env bash
# The test suite, as `make test` runs it: `cargo test`, then one line per
# test that skipped (no ../shared/data or $ODIN_DATA, no GPU), and their
# count. Tests record their skips under target/test-skips/.
set -euo pipefail
cd "$(dirname "$0")/.."
skips="$PWD/target/test-skips"
rm -rf "$skips"
mkdir -p "$skips"
status=0
ODIN_SKIP_LOG="$skips" cargo test --locked "$@" || status=$?
if compgen -G "$skips/*" >/dev/null; then
  echo
  cat "$skips"/* | sort
  n=$(cat "$skips"/* | wc -l)
  data=$(cat "$skips"/* | grep -c 'no data at' || true)
  echo "$n tests skipped (the lines above say why; $data for want of data)"
fi
exit "$status"
