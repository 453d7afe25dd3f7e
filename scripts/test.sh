#!/usr/bin/env bash
# The test suite, as `make test` runs it: `cargo test`, then one line per
# test that skipped because ../shared/data (or $ODIN_DATA) is absent, and
# their count. Tests record their skips under target/test-skips/.
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
  echo "$n tests skipped: no data at $(cat "$skips"/* | sed -n 's/.*no data at \([^ ]*\).*/\1/p' | head -1)"
fi
exit "$status"
