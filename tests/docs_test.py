"""The README is a short front door; docs/ links resolve; the run-directory layout is the code's."""

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


def _layout_names():
  text = open(os.path.join(REPO, "docs", "run_directory.md")).read()
  block = re.search(r"<!-- layout -->\n```\n(.*?)```", text, re.S).group(1)
  names = []
  for line in block.splitlines():
    if len(line) - len(line.lstrip()) > 6:
      continue  # a continuation line of a description
    first = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
    names += [n.strip().rstrip("/") for n in first.split(",")]
  return names


def test_run_directory_layout_names_are_the_codes():
  """Every file and directory name of docs/run_directory.md's layout is a literal in ban_tf/."""
  source = "".join(
    open(p).read() for p in glob.glob(os.path.join(REPO, "ban_tf", "**", "*.py"), recursive=True)
  )
  names = _layout_names()
  assert {"config.json", "gen_k", "saved_model", "DONE", "tb", "log.txt"} <= set(names), names
  missing = []
  for name in names:
    numbered = re.match(r"^(\w+)_[kS]$", name)  # gen_k: f"gen_{k}", or "gen" and an _ joined
    literals = [f'f"{numbered.group(1)}_', f'"{numbered.group(1)}"'] if numbered else [f'"{name}"']
    if not any(literal in source for literal in literals):
      missing.append(name)
  assert not missing, f"docs/run_directory.md names files the code does not write: {missing}"
