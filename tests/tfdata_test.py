"""tfdata.untuned: tf.data autotuning off on ban_tf's pipelines and on the per-replica
datasets tf.distribute builds around them, the elements unchanged (why: docs/performance.md,
"Iterator teardown"; the wait's timings are benchmarks/iterator_teardown.py's)."""

import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.data.ops import multi_device_iterator_ops

from ban_tf import data
from ban_tf import text_data
from ban_tf import tfdata
from tests import e2e_runs
from tests.conftest import SHARED_TFDS
from tests.conftest import strategy_for

_CORES = len(os.sched_getaffinity(0))  # Linux, as CI (tfdata.usable_cores falls back elsewhere)


def _untuned(ds):
  """Whether `ds` runs without autotuning, parallel transformations on every usable core."""
  tune = ds.options().autotune
  return tune.enabled is False and tune.initial_parallelism == _CORES  # None: TensorFlow's default


def _pipeline():
  ds = tf.data.Dataset.range(40).map(lambda x: x * x, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(6).prefetch(tf.data.AUTOTUNE)


_WANT = [np.arange(40)[i : i + 6] ** 2 for i in range(0, 40, 6)]  # 6 batches of 6, one of 4


def test_untuned_keeps_the_elements_and_their_order():
  assert not _untuned(_pipeline()) and _untuned(tfdata.untuned(_pipeline()))
  got = [b.numpy() for b in tfdata.untuned(_pipeline())]
  assert len(got) == len(_WANT) == 7
  for a, b in zip(got, _WANT):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("replicas", [2, 3])
def test_host_and_per_replica_datasets_are_untuned_and_batches_unchanged(replicas):
  """The pipeline the strategy draws from and each device's dataset (TensorFlow 2.21's private
  attributes: input_lib's worker iterator -> OwnedMultiDeviceIterator): a TensorFlow that
  moves them, or stops calling the wrapped function, fails here."""
  strategy = strategy_for(replicas)
  iterator = iter(strategy.experimental_distribute_dataset(tfdata.untuned(_pipeline())))
  (worker,) = iterator._iterators  # pylint: disable=protected-access
  assert _untuned(worker._dataset)  # pylint: disable=protected-access
  devices = worker._iterator._device_iterators  # pylint: disable=protected-access
  assert len(devices) == replicas and all(_untuned(it._dataset) for it in devices)
  got = [
    np.concatenate([x.numpy() for x in strategy.experimental_local_results(b)]) for b in iterator
  ]
  assert len(got) == len(_WANT)
  for a, b in zip(got, _WANT):  # each global batch split over the replicas, in order
    np.testing.assert_array_equal(a, b)


_AUGMENT = [("none", False), ("flip_crop", False), ("flip_crop", True)]


def test_every_image_and_language_model_pipeline_is_untuned(tmp_path):
  image = data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_examples=40, val_examples=12, test_split="test[:20]"
  )
  pipelines = [image.train(8, seed=0, augment=a, device_augment=d)[0] for a, d in _AUGMENT]
  pipelines += [image.val(8), image.test(8)]
  e2e_runs.lm_corpus(str(tmp_path), lines_per_split={"train": 12, "valid": 4, "test": 4})
  for state in ("reset", "carry"):
    lm = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=5, state=state)
    pipelines += [lm.train(2, seed=0)[0], lm.val(2), lm.test(2)]
  assert len(pipelines) == 11
  assert all(_untuned(ds) for ds in pipelines)


def test_a_tensorflow_without_the_private_function_warns_and_still_untunes(monkeypatch, caplog):
  monkeypatch.delattr(multi_device_iterator_ops, "_create_device_dataset")
  with caplog.at_level("WARNING", logger="absl"):
    ds = tfdata.untuned(_pipeline())
  assert _untuned(ds)
  assert "per-replica datasets keep autotuning" in caplog.text, caplog.text
