"""How long TensorFlow takes to delete a tf.data iterator, plain and distributed.

    python benchmarks/iterator_teardown.py [--lifetimes=1,3,10,20] [--replicas=2]
        [--autotune=on|off] [--replica_autotune=on|off]

Each lifetime L: an iterator over a small map/batch/prefetch pipeline is drawn from for L
seconds (a batch every ~2 ms), then deleted, and the deletion is timed; first a plain
iterator, then one over `strategy.experimental_distribute_dataset` on `--replicas` logical
CPUs (MirroredStrategy, what Keras' fit and evaluate draw from with several replicas). One
line per iterator: `kind=plain|distributed lifetime_s=L delete_s=D`. `--autotune=off` turns
tf.data autotuning off for that pipeline, `--replica_autotune=off` for the per-replica datasets
that tf.distribute's MultiDeviceIterator builds around it (as ban_tf.tfdata does; both off: the fix).

Why it exists, what it found and what it costs the test suite and real runs:
docs/performance.md, "Iterator teardown" (deleting an autotuned iterator,
distributed ones most, can wait with no CPU in use for tf.data's autotuning thread).
"""

import gc
import os
import sys
import time

from absl import app
from absl import flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow loads (in main)

FLAGS = flags.FLAGS
flags.DEFINE_list("lifetimes", ["1", "3", "10", "20"], "Seconds each iterator is drawn from.")
flags.DEFINE_integer("replicas", 2, "Logical CPU devices of the distributed iterator.")
flags.DEFINE_enum("autotune", "on", ["on", "off"], "tf.data.Options().autotune.enabled.")
flags.DEFINE_enum(
  "replica_autotune", "on", ["on", "off"], "The same, on tf.distribute's per-replica datasets."
)


def _pipeline(tf):
  ds = tf.data.Dataset.range(10**9)
  ds = ds.map(lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(8).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.autotune.enabled = FLAGS.autotune == "on"
  return ds.with_options(options)


def _untune_replica_datasets(tf):
  """What ban_tf.tfdata does to the per-replica datasets, copied so that this file alone
  reproduces the wait for a TensorFlow bug report (it imports no ban_tf)."""
  from tensorflow.python.data.ops import multi_device_iterator_ops as mdi

  make = mdi._create_device_dataset

  def untuned(*args, **kwargs):
    options = tf.data.Options()
    options.autotune.enabled = False
    return make(*args, **kwargs).with_options(options)

  mdi._create_device_dataset = untuned


def _time_delete(make_iterator, lifetime):
  """Seconds taken by `del` of an iterator drawn from for `lifetime` s (garbage collected first)."""
  iterator = make_iterator()
  start = time.time()
  while time.time() - start < lifetime:
    next(iterator)
    time.sleep(0.002)
  gc.collect()
  start = time.time()
  del iterator
  return time.time() - start


def main(argv):
  del argv
  import tensorflow as tf  # after absl parsed the flags: the logical devices come first

  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(FLAGS.replicas)]
  )
  strategy = tf.distribute.MirroredStrategy(
    [f"/cpu:{i}" for i in range(FLAGS.replicas)],
    cross_device_ops=tf.distribute.ReductionToOneDevice(),
  )
  if FLAGS.replica_autotune == "off":
    _untune_replica_datasets(tf)
  ds = _pipeline(tf)
  distributed = strategy.experimental_distribute_dataset(ds)
  print(
    f"tensorflow={tf.__version__} replicas={FLAGS.replicas} autotune={FLAGS.autotune} "
    f"replica_autotune={FLAGS.replica_autotune}"
  )
  for kind, make in (("plain", lambda: iter(ds)), ("distributed", lambda: iter(distributed))):
    for lifetime in (float(s) for s in FLAGS.lifetimes):
      took = _time_delete(make, lifetime)
      print(f"kind={kind} lifetime_s={lifetime:g} delete_s={took:.3f}", flush=True)


if __name__ == "__main__":
  sys.exit(app.run(main))
