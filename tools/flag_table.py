"""Prints the markdown flag table of ban_tf.main (for docs/report.md and the README).

  python tools/flag_table.py > /tmp/flags.md

Generated from main.define_flags, so the table cannot drift from the flags.
"""

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ban_tf import main  # pylint: disable=g-import-not-at-top,wrong-import-position


def flag_table():
  fv = flags.FlagValues()
  main.define_flags(fv)
  lines = ["| Group | Flag | Default | Meaning |", "|---|---|---|---|"]
  for title, entries in main.flag_groups(fv):
    group = title.split(":")[0]
    for name, default, text in entries:
      cells = [group, f"`--{name}`", f"`{default}`" if default else "", text.replace("|", "\\|")]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.stdout.write(flag_table())
