"""Test setup: two logical CPU devices (for 1- vs 2-replica tests), quiet TF logs.

Runs before any test module imports TensorFlow, so the logical device
configuration can still be applied.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ban_tf  # pylint: disable=g-import-not-at-top,unused-import  # sets oneDNN on before TF loads
import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
tf.get_logger().setLevel("ERROR")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The prepared TFDS data sets live in shared/ beside the checkout. realpath: under
# Bazel this file is a runfiles symlink into the source tree.
_SOURCE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SHARED_TFDS = os.environ.get("BAN_TF_SHARED_TFDS") or os.path.join(
    os.path.dirname(_SOURCE), "shared", "tensorflow_datasets")
