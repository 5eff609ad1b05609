"""Test setup: two logical CPU devices (for 1- vs 2-replica tests), quiet TF logs.

Runs before any test module imports TensorFlow, so the logical device
configuration can still be applied.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
tf.get_logger().setLevel("ERROR")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TFDS = os.path.join(os.path.dirname(REPO), "shared", "tensorflow_datasets")
