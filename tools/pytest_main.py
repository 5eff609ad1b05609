"""Entry point of pytest_test (//tools:pytest.bzl): runs pytest under Bazel."""

import os
import sys

import pytest

if __name__ == "__main__":
  args = ["-p", "no:cacheprovider"] + sys.argv[1:]
  xml = os.environ.get("XML_OUTPUT_FILE")  # Bazel's test.xml
  if xml:
    args += ["--junitxml=" + xml]
  sys.exit(pytest.main(args))
