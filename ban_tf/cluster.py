"""Multi-worker training: who is the chief, where each worker writes, barriers.

`--strategy=multi_worker` trains with tf.distribute.MultiWorkerMirroredStrategy,
configured from the TF_CONFIG environment variable, e.g. on host 0 of two:

  TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
              "task": {"type": "worker", "index": 0}}'

Every worker runs the same program on the same flags. The usual Keras pattern
decides who writes: the chief (worker 0, or the task of type "chief") writes the
run directory (exports, metrics, results, TensorBoard, checkpoints); every other
worker writes the same files into a private temporary directory that is deleted
at the end, because saving and evaluating are collective operations that every
worker must take part in. Everything a worker *reads* (DONE markers, the teacher
SavedModel, resumable checkpoints) comes from the chief's run directory, so
`--run_dir` must be on storage that all hosts see (NFS, GCS, ...).
"""

import json
import os
import shutil
import tempfile

import tensorflow as tf


def task():
  """(task type, task index) from TF_CONFIG; ("worker", 0) when it is unset."""
  spec = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
  return spec.get("type") or "worker", int(spec.get("index") or 0)


def is_multi_worker(strategy):
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy=None):
  """True in single-process runs and on the multi-worker chief."""
  if strategy is not None and not is_multi_worker(strategy):
    return True
  cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
  kind, index = task()
  if "chief" in cluster:
    return kind == "chief"
  return kind == "worker" and index == 0


def make_strategy():
  """MultiWorkerMirroredStrategy from TF_CONFIG (ring all-reduce: CPU and GPU)."""
  options = tf.distribute.experimental.CommunicationOptions(
    implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
  )
  return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def write_dir(run_dir, strategy):
  """The directory this process writes: `run_dir` on the chief, a private temp dir elsewhere."""
  if is_chief(strategy):
    return run_dir
  kind, index = task()
  return tempfile.mkdtemp(prefix=f"ban_tf_{kind}{index}_")


def remove_write_dir(path, run_dir):
  """Deletes a worker's private directory (never the chief's run directory)."""
  if os.path.abspath(path) != os.path.abspath(run_dir):
    shutil.rmtree(path, ignore_errors=True)


def barrier(strategy):
  """Returns once every worker has reached it (a one-scalar all-reduce)."""
  if is_multi_worker(strategy):
    one = strategy.run(lambda: tf.constant(1.0))
    strategy.reduce(tf.distribute.ReduceOp.SUM, one, axis=None).numpy()
