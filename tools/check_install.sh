#!/usr/bin/env bash
# Packaging check (CI): `pip install .` and `pip install -e .` into a fresh venv,
# then import every module and run `python -m ban_tf.main --help` from outside the
# source tree.
#   tools/check_install.sh [python]   (default: .venv/bin/python3)
# What it proves: pyproject.toml builds a wheel and an editable install holding the
# whole ban_tf package, whose modules import and whose CLI starts, with the pinned
# dependencies. What it does not: that pip resolves those pins from scratch (the
# fresh venv sees the CI venv's already-installed packages through a .pth file, and
# --no-deps skips resolution; `pip install -r requirements.txt` in .ci/run does that).
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=2
ws="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$ws/.venv/bin/python3}"
deps="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

check() {  # $1: mode (wheel|editable); $2: where ban_tf must be imported from
  local venv="$tmp/$1"
  "$python" -m venv "$venv"
  local site
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$deps" > "$site/ci_deps.pth"  # the dependencies, without reinstalling them
  if [ "$1" = wheel ]; then  # from a copy: setuptools leaves build/ where it builds
    mkdir "$tmp/src" && cp -r "$ws/pyproject.toml" "$ws/README.md" "$ws/ban_tf" "$ws/flags" "$tmp/src/"
    "$venv/bin/python" -m pip install -q --no-deps "$tmp/src"
  else
    "$venv/bin/python" -m pip install -q --no-deps -e "$ws"
  fi
  (cd "$tmp" && "$venv/bin/python" - "$2" "$ws/ban_tf" <<'PY'
import glob, importlib, os, pkgutil, sys
import ban_tf
where = os.path.realpath(os.path.dirname(ban_tf.__file__))
assert where.startswith(os.path.realpath(sys.argv[1])), f"ban_tf imported from {where}, not {sys.argv[1]}"
def sources(root):  # every .py file of the package, subpackages included
  return {os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)}
missing = sources(sys.argv[2]) - sources(where)
assert not missing, f"not installed: {sorted(missing)}"
names = [m.name for m in pkgutil.walk_packages(ban_tf.__path__, "ban_tf.")]
assert {"ban_tf.main", "ban_tf.data", "ban_tf.distiller", "ban_tf.export"} <= set(names), names
for name in names:
  importlib.import_module(name)
print(f"ok: {len(names)} modules import from {where}")
PY
  )
  local help
  help="$(cd "$tmp" && "$venv/bin/python" -m ban_tf.main --help)"
  echo "${help%%$'\n'*}"
  grep -q -- "--image_folder" <<<"$help"
  # The flagfiles: the installed copy (wheel) or the checkout's (editable), from outside both.
  local smoke
  smoke="$(cd "$tmp" && "$venv/bin/python" -m ban_tf.flagfile smoke)"
  if [ "$1" = wheel ]; then
    [[ "$smoke" == "$venv/share/ban_tf/flags/smoke.flags" ]] || { echo "flagfile at $smoke"; exit 1; }
  else
    [[ "$smoke" == "$ws/flags/smoke.flags" ]] || { echo "flagfile at $smoke"; exit 1; }
  fi
  echo "flagfile: $smoke"
}

check wheel "$tmp/wheel"
check editable "$ws/ban_tf"
echo "check_install: pip install . and pip install -e . work"
