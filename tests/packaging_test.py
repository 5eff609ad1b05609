"""pyproject.toml: the pip package's pins are requirements.txt's (runtime) and
requirements-test.txt's (its `test` extra), and it holds ban_tf and the flagfiles.

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
    if l.strip() and not l.strip().startswith(("#", "-r "))
  )


def test_pyproject_pins_equal_requirements():
  """Runtime pins: requirements.txt = [project] dependencies (no pytest: the package does not
  need it); the tests' pins: requirements-test.txt = the `test` extra."""
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  with open(os.path.join(REPO, "requirements.txt")) as f:
    runtime = _pins(f)
  with open(os.path.join(REPO, "requirements-test.txt")) as f:
    lines = f.read().splitlines()
  assert "-r requirements.txt" in lines
  assert _pins(project["dependencies"]) == runtime
  assert _pins(project["optional-dependencies"]["test"]) == _pins(lines)
  assert not [p for p in runtime if p.startswith("pytest")]
  assert all("==" in pin for pin in runtime + _pins(lines))


def test_flagfiles_are_package_data_and_found_from_a_checkout():
  """pip install . copies flags/ (data-files); ban_tf.flagfile finds them, and main resolves
  --flagfile=flags/NAME to them where the current directory has no flags/."""
  from ban_tf import flagfile  # pylint: disable=g-import-not-at-top

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    data_files = tomllib.load(f)["tool"]["setuptools"]["data-files"]
  shipped = {os.path.basename(p) for patterns in data_files.values() for p in patterns}
  assert shipped == {"*.flags"}
  assert sorted(data_files) == ["share/ban_tf/flags", "share/ban_tf/flags/paper"]
  smoke = os.path.join(REPO, "flags", "smoke.flags")
  for name in ("smoke", "smoke.flags", "flags/smoke.flags"):
    assert os.path.samefile(flagfile.path(name), smoke)
  assert flagfile.path("paper/table1_wrn-28-1").endswith("table1_wrn-28-1.flags")
  cwd = os.getcwd()
  try:
    os.chdir("/")
    (resolved,) = flagfile.resolve_argv(["--flagfile=flags/smoke.flags"])
    assert os.path.samefile(resolved.split("=", 1)[1], smoke)
    assert flagfile.resolve_argv(["--flagfile=flags/none.flags"]) == ["--flagfile=flags/none.flags"]
  finally:
    os.chdir(cwd)


def test_pyproject_packages_ban_tf():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    toml = tomllib.load(f)
  assert toml["tool"]["setuptools"]["packages"]["find"]["include"] == ["ban_tf", "ban_tf.*"]
  assert toml["project"]["name"] == "ban_tf"
