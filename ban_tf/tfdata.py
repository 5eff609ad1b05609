"""The autotuning options of the tf.data pipelines ban_tf iterates: their one owner.

Autotuning is off, on ban_tf's pipelines and on the per-replica datasets that
`tf.distribute`'s MultiDeviceIterator builds around them: with it, deleting an iterator
can block for up to a minute in TensorFlow 2.21 (the cause, the figures and what is not
covered: docs/performance.md, "Iterator teardown"). Parallel transformations given
`tf.data.AUTOTUNE` then run at `autotune.initial_parallelism`, set here to the CPU cores
this process may use (TensorFlow's default, 16, would cap a larger host; autotuning
would have tuned up to the cores). The elements and their order do not change.
"""

import functools
import os

from absl import logging
import tensorflow as tf

# Private: the only way to reach the per-replica datasets' options (TensorFlow gives them
# its defaults). tests/tfdata_test.py fails if TensorFlow changes it; if the function is
# gone, ban_tf warns once and runs without the per-replica half.
from tensorflow.python.data.ops import multi_device_iterator_ops


def untuned(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` without tf.data autotuning: the same elements in the same order.

  Also, once per process (and so for any code in it, ban_tf's or not), turns autotuning off
  on the per-replica datasets of every distributed iterator made afterwards
  (MirroredStrategy or MultiWorkerMirroredStrategy with 2 or more devices: Keras' fit,
  evaluate and predict).

  Args:
    ds: any tf.data.Dataset.

  Returns:
    `ds.with_options(...)`: `options().autotune.enabled` False and
    `options().autotune.initial_parallelism` the number of usable CPU cores.
  """
  _untune_replica_datasets()
  return ds.with_options(_options())


def _options():
  options = tf.data.Options()
  options.autotune.enabled = False
  options.autotune.initial_parallelism = usable_cores()
  return options


def usable_cores() -> int:
  """The CPU cores this process may run on (its affinity where the OS has one, as on Linux)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _untune_replica_datasets():
  make = getattr(multi_device_iterator_ops, "_create_device_dataset", None)
  if make is None:
    logging.log_first_n(
      logging.WARNING,
      "this TensorFlow has no multi_device_iterator_ops._create_device_dataset: per-replica "
      "datasets keep autotuning (docs/performance.md, 'Iterator teardown')",
      1,
    )
    return
  if getattr(make, "ban_tf_untuned", False):
    return

  @functools.wraps(make)
  def create_device_dataset(*args, **kwargs):
    return make(*args, **kwargs).with_options(_options())

  create_device_dataset.ban_tf_untuned = True
  multi_device_iterator_ops._create_device_dataset = create_device_dataset  # pylint: disable=protected-access
