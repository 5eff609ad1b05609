"""Tests for `python -m ban_tf.main --help` (flags grouped by purpose) and tools/flag_table.py."""

import os
import re
import subprocess
import sys

from absl import flags

from ban_tf import main
from tests.conftest import REPO


def _fresh_flags():
  fv = flags.FlagValues()
  main.define_flags(fv)
  return fv


def test_every_flag_once_under_its_tag():
  fv = _fresh_flags()
  text = main.grouped_help(fv)
  titles = [title for _, title in main.GROUPS]
  lines = text.splitlines()
  section = None
  seen = {}
  for line in lines:
    if line.rstrip(":") in titles and line.endswith(":"):
      section = line.rstrip(":")
    m = re.match(r"  --(\w+)=", line)
    if m:
      assert m.group(1) not in seen, f"--{m.group(1)} listed twice"
      seen[m.group(1)] = section
  tag_of = {title: tag for tag, title in main.GROUPS}
  ours = {name for name in fv if re.match(r"\[\w+\] ", fv[name].help or "")}
  assert set(seen) == ours and len(ours) > 20
  for name, section in seen.items():
    assert fv[name].help.startswith(f"[{tag_of[section]}] "), (name, section)
  assert "[data]" not in text and "[optim]" not in text  # tags become headings
  # Sections appear in purpose order, not alphabetically.
  assert [l[:-1] for l in lines if l[:-1] in titles] == titles


def test_help_shows_defaults():
  fv = _fresh_flags()
  text = main.grouped_help(fv)
  for name in ("gens", "epochs", "lr", "arch", "nesterov", "lr_milestones"):
    flag = fv[name]
    default = (
      ",".join(flag.default)
      if isinstance(flag.default, list)
      else str(flag.default).lower()
      if isinstance(flag.default, bool)
      else str(flag.default)
    )
    assert f"--{name}={default} " in text, name


def test_help_binary_exits_zero():
  for arg in ("--help", "-h"):
    proc = subprocess.run(
      [sys.executable, "-m", "ban_tf.main", arg],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for title in ("Data:", "Models:", "Optimisation:", "Execution:"):
      assert title in proc.stdout
    assert "--temperature=1.0" in proc.stdout
    assert "absl.flags" not in proc.stdout  # not absl's per-module listing


def test_flag_table_lists_every_flag():
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import flag_table  # pylint: disable=g-import-not-at-top

  table = flag_table.flag_table()
  rows = [l for l in table.splitlines() if l.startswith("| ") and "`--" in l]
  fv = _fresh_flags()
  ours = [n for n in fv if re.match(r"\[\w+\] ", fv[n].help or "")]
  assert len(rows) == len(ours)
  for name in ours:
    assert sum(f"`--{name}`" in r for r in rows) == 1, name
  assert all(r.count(" | ") == 3 for r in rows)  # pipes in help text are escaped


def test_docs_flags_page_is_current():
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import flag_table  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, "docs", "flags.md")) as f:
    assert f.read() == flag_table.page(), "rerun python tools/flag_table.py --write"
