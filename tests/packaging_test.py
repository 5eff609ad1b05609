"""pyproject.toml: the pip package's pins are requirements.txt's, and it holds ban_tf.

The install itself (pip install . / -e . into a fresh venv) is checked by
tools/check_install.sh, which .ci/run runs.
"""

import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _pins(lines):
  return sorted(
    re.sub(r"\s+", "", l).lower().replace("_", "-")
    for l in lines
    if l.strip() and not l.strip().startswith("#")
  )


def test_pyproject_pins_equal_requirements():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    required = _pins(f)
  packaged = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
  assert packaged == required
  assert all("==" in pin for pin in packaged)


def test_pyproject_packages_ban_tf():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    toml = tomllib.load(f)
  assert toml["tool"]["setuptools"]["packages"]["find"]["include"] == ["ban_tf", "ban_tf.*"]
  assert toml["project"]["name"] == "ban_tf"
