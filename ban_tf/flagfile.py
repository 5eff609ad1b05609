"""The flagfiles that come with ban_tf (the repository's flags/), from a checkout or a pip install.

  python -m ban_tf.flagfile smoke            # prints the path of flags/smoke.flags
  python -m ban_tf.main --flagfile=$(python -m ban_tf.flagfile smoke) --data_dir=...

In a checkout they are flags/ beside the ban_tf package; `pip install .` copies them
to <prefix>/share/ban_tf/flags (pyproject.toml, [tool.setuptools.data-files]).
`python -m ban_tf.main --flagfile=flags/NAME.flags` reads them from there too when
no flags/NAME.flags exists under the current directory (main._parse).
"""

import os
import sys

from ban_tf import errors

PREFIX = "flags" + os.sep  # how the README names them: --flagfile=flags/smoke.flags


def directory() -> str:
  """The directory of ban_tf's flagfiles: the checkout's flags/, else the installed copy.

  Raises:
    errors.UsageError: neither exists (a package built without them).
  """
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "flags")
  installed = os.path.join(sys.prefix, "share", "ban_tf", "flags")
  for d in (checkout, installed):
    if os.path.isdir(d):
      return d
  raise errors.UsageError(
    f"ban_tf's flagfiles are in neither {checkout} nor {installed}: reinstall ban_tf (pip install .)"
  )


def path(name: str) -> str:
  """The file of flagfile `name`: "smoke", "smoke.flags", "flags/smoke.flags" or
  "paper/table1_wrn-28-1" name flags/smoke.flags and flags/paper/table1_wrn-28-1.flags.

  Raises:
    errors.UsageError: no such flagfile (the line lists those there are).
  """
  rel = name[len(PREFIX) :] if name.startswith(PREFIX) else name
  rel = rel if rel.endswith(".flags") else rel + ".flags"
  root = directory()
  found = os.path.join(root, rel)
  if not os.path.isfile(found):
    names = sorted(
      os.path.relpath(os.path.join(d, f), root)[: -len(".flags")]
      for d, _, files in os.walk(root)
      for f in files
      if f.endswith(".flags")
    )
    top = [n for n in names if os.sep not in n]
    raise errors.UsageError(
      f"no flagfile {name!r} in {root}: use one of {', '.join(top)} or paper/<name> "
      f"({len(names) - len(top)} of them)"
    )
  return found


def resolve_argv(argv):
  """`argv` with each --flagfile=flags/NAME that does not exist under the current directory
  replaced by ban_tf's own flags/NAME (a pip-installed ban_tf run outside the checkout)."""
  out = []
  for arg in argv:
    key, eq, value = arg.partition("=")
    if key in ("--flagfile", "-flagfile") and eq and value.startswith(PREFIX):
      if not os.path.exists(value):
        try:
          value = path(value)
        except errors.UsageError:
          pass  # absl names the missing file, as before
      arg = f"{key}={value}"
    out.append(arg)
  return out


def main(argv) -> int:
  if len(argv) != 2:
    print(f"usage: python -m ban_tf.flagfile NAME (e.g. smoke); they are in {directory()}")
    return 2
  try:
    print(path(argv[1]))
  except errors.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
