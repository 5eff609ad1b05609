"""The tf.data options of every pipeline ban_tf iterates: their one owner.

Autotuning is off, on ban_tf's pipelines and on the per-replica datasets that
`tf.distribute`'s MultiDeviceIterator builds around them, because deleting an iterator
that autotunes can block for up to a minute (TensorFlow 2.21: a lost wake-up of the
iterator's autotuning thread, `Model::OptimizeLoop`; docs/performance.md, "Iterator
teardown"). Nothing else changes: with autotuning off, `num_parallel_calls=AUTOTUNE`
stays at TensorFlow's fixed default, min(16, CPU cores), and the elements, their order
and every number computed from them are the same.
"""

import tensorflow as tf

# Private, and the only way to reach the per-replica datasets' options (TensorFlow gives
# them its defaults); tests/tfdata_test.py fails if TensorFlow moves it.
from tensorflow.python.data.ops import multi_device_iterator_ops


def untuned(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`ds` with tf.data autotuning off (same elements, same order).

  Also, once per process, turns it off on the per-replica datasets of any distributed
  iterator made afterwards (MirroredStrategy with 2 or more replicas: Keras' fit,
  evaluate and predict).

  Args:
    ds: any tf.data.Dataset.

  Returns:
    `ds.with_options(...)`, with `options().autotune.enabled` False.
  """
  _untune_replica_datasets()
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def _untune_replica_datasets():
  make = multi_device_iterator_ops._create_device_dataset  # pylint: disable=protected-access
  if getattr(make, "ban_tf_untuned", False):
    return

  def create_device_dataset(*args, **kwargs):
    options = tf.data.Options()
    options.autotune.enabled = False
    return make(*args, **kwargs).with_options(options)

  create_device_dataset.ban_tf_untuned = True
  multi_device_iterator_ops._create_device_dataset = create_device_dataset  # pylint: disable=protected-access
