import glob
import os
import sys

import numpy as np
import tensorflow as tf

from bazel_smoke import lib  # workspace-relative import, like `from ban_tf import losses`


def main():
    print("python:", sys.executable, "sys.path[0]:", sys.path[0])
    assert sys.executable.endswith(".venv/bin/python3"), sys.executable
    assert float(tf.reduce_sum(tf.ones(3))) == 3.0
    assert lib.total(np.arange(4)) == 6.0
    # data= files are in the runfiles tree, cwd is the workspace's runfiles root.
    with open("bazel_smoke/testdata/sample.flags") as f:
        assert f.read().strip() == "--epochs=3"
    flags = sorted(glob.glob("flags/**", recursive=True))
    for path in flags:
        if os.path.isfile(path):
            open(path).read()
    print("flags visible:", flags)
    print("OK tf", tf.__version__, "numpy", np.__version__)


if __name__ == "__main__":
    main()
