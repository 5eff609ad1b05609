#!/bin/sh
echo "remote_coverage_tools is stubbed for offline Bazel: coverage is unsupported" >&2
exit 1
