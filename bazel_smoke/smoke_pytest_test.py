import os

import tensorflow as tf

from bazel_smoke import lib


def test_reduce_sum():
    assert float(tf.reduce_sum(tf.ones(3))) == 3.0
    assert lib.total([1.0, 2.0]) == 3.0


def test_flags_dir_is_in_runfiles():
    # //:flags is a (possibly empty) glob; the directory exists once it has files.
    assert not os.path.exists("flags") or os.path.isdir("flags")
