"""pytest_test: a py_test that runs pytest on its srcs (plain test functions
need no `if __name__ == "__main__"` block)."""

load("//third_party/pip:requirements.bzl", "requirement")

def pytest_test(name, srcs, deps = [], args = [], **kwargs):
    native.py_test(
        name = name,
        srcs = srcs + ["//tools:pytest_main.py"],
        main = "//tools:pytest_main.py",
        args = ["-q"] + args + ["$(location %s)" % s for s in srcs],
        deps = deps + [requirement("pytest")],
        python_version = "PY3",
        **kwargs
    )
