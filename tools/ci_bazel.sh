#!/usr/bin/env bash
# Run the Bazel test suite offline (Debian's bazel-bootstrap, Bazel 4.2.3).
#   tools/ci_bazel.sh [extra bazel test args...]
# Installs bazel-bootstrap with apt-get when `bazel` is missing; if that is not
# possible it prints why and exits 0 (Bazel is optional in CI, pytest is not).
# Otherwise its exit status is that of `bazel test` (0 ok, 3 test failures,
# 1/2 build or usage errors, 4 no test targets).
set -uo pipefail

ws="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ws" || exit 1
BAZEL="${BAZEL:-bazel}"

if ! command -v "$BAZEL" >/dev/null 2>&1; then
  echo "ci_bazel: $BAZEL not found; installing Debian's bazel-bootstrap"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 &&
    apt-get update -qq >/dev/null 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap >/dev/null 2>&1 &&
    command -v "$BAZEL" >/dev/null 2>&1; then
    echo "ci_bazel: installed bazel-bootstrap"
  else
    echo "ci_bazel: could not install bazel-bootstrap (apt unreachable or not root); skipping Bazel tests"
    exit 0
  fi
fi

python="${BAN_TF_PYTHON:-$ws/.venv/bin/python3}"
if [ ! -x "$python" ]; then
  echo "ci_bazel: no Python interpreter at $python; create the venv first (see docs/bazel.md)" >&2
  exit 1
fi

log="$(mktemp)"
start=$(date +%s)
"$BAZEL" test --config=ci //... "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

# One summary line in the plain 'N passed, N failed' form, from Bazel's
# per-target results.
passed=$(grep -cE '^//[^ ]+ +(\(cached\) )?PASSED' "$log")
failed=$(grep -cE '^//[^ ]+ +(\(cached\) )?(FAILED|TIMEOUT|FLAKY|INCOMPLETE|NO STATUS)' "$log")
rm -f "$log"
echo "bazel test: exit $rc in $(( $(date +%s) - start ))s"
echo "bazel: $passed passed, $failed failed"

# Do not leave the Bazel server (a JVM) running after CI.
"$BAZEL" shutdown >/dev/null 2>&1 || true
exit "$rc"
