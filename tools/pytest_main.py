"""Entry point of pytest_test (//tools:pytest.bzl): runs pytest under Bazel."""

import os
import shlex
import sys

import pytest

if __name__ == "__main__":
  args = ["-p", "no:cacheprovider"] + sys.argv[1:]
  xml = os.environ.get("XML_OUTPUT_FILE")  # Bazel's test.xml
  if xml:
    args += ["--junitxml=" + xml]
  code = pytest.main(args)
  # With a marker filter (.ci/run: --test_env=PYTEST_ADDOPTS="-m 'not slow'"), a file whose
  # tests are all deselected has nothing to run: that target passes (pytest's exit 5 otherwise).
  given = args + shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
  if code == pytest.ExitCode.NO_TESTS_COLLECTED and "-m" in given:
    code = 0
  sys.exit(code)
