"""pip dependencies, declared the rules_python way but resolved offline.

BUILD files write `deps = [requirement("tensorflow")]` exactly as with
rules_python's `load("@pip//:requirements.bzl", "requirement")`. Here each
requirement resolves to an empty py_library in //third_party/pip: the code
itself comes from the interpreter's venv (<workspace>/.venv, see
//tools:python_venv.bzl). An unknown name fails at analysis time, so the
declarations stay honest; //third_party/pip:requirements_sync_test checks the
list against requirements.txt. See docs/bazel.md for the bzlmod/pip.parse
equivalent.
"""

# Normalized (PEP 503, "-" and "." -> "_") names from requirements.txt.
PIP_PACKAGES = [
    "absl_py",
    "importlib_resources",
    "keras",
    "matplotlib",
    "numpy",
    "pillow",
    "psutil",
    "pytest",
    "pytest_xdist",
    "scipy",
    "tensorboard",
    "tensorflow",
    "tensorflow_datasets",
]

def _normalize(name):
    return name.lower().replace("-", "_").replace(".", "_")

def requirement(name):
    """Label of the (venv-provided) pip package `name`."""
    return "//third_party/pip:" + _normalize(name)

def pip_stub_libraries():
    for pkg in PIP_PACKAGES:
        native.py_library(
            name = pkg,
            visibility = ["//visibility:public"],
        )
