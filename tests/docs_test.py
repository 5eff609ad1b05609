"""The README is a short front door; docs/ links resolve; the run-directory layout is the code's."""

import ast
import glob
import os
import re

from tests.conftest import REPO

README_MAX_LINES = 250


def _pages():
  return [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _anchors(path):
  """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces to -."""
  text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
  anchors = set()
  for heading in re.findall(r"^#+ +(.+?)\s*$", text, re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchors.add(slug)
  return anchors


def _links(path):
  text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
  text = re.sub(r"`[^`\n]*`", "", text)
  return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_is_a_short_front_door():
  with open(os.path.join(REPO, "README.md")) as f:
    lines = f.read().splitlines()
  assert len(lines) <= README_MAX_LINES, (
    f"README.md has {len(lines)} lines: move reference to docs/"
  )


def test_every_relative_link_resolves():
  broken = []
  for page in _pages():
    for link in _links(page):
      if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
        continue
      target, _, anchor = link.partition("#")
      path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
      if not os.path.exists(path):
        broken.append(f"{os.path.relpath(page, REPO)}: {link} (no such file)")
      elif anchor and path.endswith(".md") and anchor not in _anchors(path):
        broken.append(f"{os.path.relpath(page, REPO)}: {link} (no such heading)")
  assert not broken, "\n".join(broken)


def rundir_layout():
  """The layout section of ban_tf/rundir.py's docstring (the layout's one description), dedented."""
  doc = ast.get_docstring(ast.parse(open(os.path.join(REPO, "ban_tf", "rundir.py")).read()))
  head = "Layout of a run directory (names: layout.py):\n\n"
  body = doc[doc.index(head) + len(head) : doc.index("\n\nA model is finished")]
  return "\n".join(line[2:] if line.startswith("  ") else line for line in body.split("\n"))


def test_run_directory_layout_is_rundirs():
  """docs/run_directory.md's layout block is rundir.py's docstring layout, verbatim (and that
  names what the code writes: tests/layout_test.py)."""
  text = open(os.path.join(REPO, "docs", "run_directory.md")).read()
  block = re.search(r"<!-- layout -->\n```\n(.*?)```\n<!-- /layout -->", text, re.S).group(1)
  assert block.rstrip("\n") == rundir_layout(), (
    "docs/run_directory.md's layout differs from ban_tf/rundir.py's docstring: copy it over"
  )
  assert {"config.json", "gen_k/", "saved_model/", "DONE", "predictions.npz"} <= set(block.split())
