"""Entry point of pytest_test (//tools:pytest.bzl): runs pytest under Bazel."""

import os
import sys

import pytest

if __name__ == "__main__":
  args = ["-p", "no:cacheprovider"] + sys.argv[1:]
  xml = os.environ.get("XML_OUTPUT_FILE")  # Bazel's test.xml
  if xml:
    args += ["--junitxml=" + xml]
  code = pytest.main(args)
  # With a marker filter (`--test_arg=-m --test_arg='not slow'`, .ci/run), a file whose tests
  # are all deselected has nothing to run: that target passes (pytest's exit 5 otherwise).
  if code == pytest.ExitCode.NO_TESTS_COLLECTED and "-m" in args:
    code = 0
  sys.exit(code)
