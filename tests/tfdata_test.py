"""tfdata.untuned: no tf.data autotuning on any pipeline ban_tf iterates, nor on the
per-replica datasets tf.distribute builds around them (deleting an autotuning iterator
can wait up to a minute: docs/performance.md, "Iterator teardown"); same elements.

Timings are benchmarks/iterator_teardown.py's; these tests check the options that
remove the wait, so a TensorFlow that moves them fails here rather than waiting again.
"""

import numpy as np
import pytest
import tensorflow as tf

from ban_tf import data
from ban_tf import text_data
from ban_tf import tfdata
from tests import e2e_runs
from tests.conftest import SHARED_TFDS
from tests.conftest import strategy_for


def _autotunes(ds):
  return ds.options().autotune.enabled is not False  # None: TensorFlow's default, on


def _per_replica_datasets(iterator):
  """The datasets behind each replica's iterator of a distributed iterator (TensorFlow 2.21's
  private attributes: input_lib's worker iterators -> OwnedMultiDeviceIterator)."""
  (worker,) = iterator._iterators  # pylint: disable=protected-access
  return [it._dataset for it in worker._iterator._device_iterators]  # pylint: disable=protected-access


def _pipeline():
  ds = tf.data.Dataset.range(40).map(lambda x: x * x, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(6).prefetch(tf.data.AUTOTUNE)


def test_untuned_keeps_the_elements_and_their_order():
  assert _autotunes(_pipeline()) and not _autotunes(tfdata.untuned(_pipeline()))
  want = [b.numpy() for b in _pipeline()]
  got = [b.numpy() for b in tfdata.untuned(_pipeline())]
  assert len(got) == len(want) == 7
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("replicas", [2, 3])
def test_per_replica_datasets_do_not_autotune_and_batches_are_unchanged(replicas):
  strategy = strategy_for(replicas)
  tfdata.untuned(_pipeline())  # installs the per-replica option, once per process
  iterator = iter(strategy.experimental_distribute_dataset(tfdata.untuned(_pipeline())))
  per_replica = _per_replica_datasets(iterator)
  assert len(per_replica) == replicas
  assert not any(_autotunes(ds) for ds in per_replica)
  got = [strategy.experimental_local_results(b) for b in iterator]
  want = [
    strategy.experimental_local_results(b)
    for b in strategy.experimental_distribute_dataset(_pipeline())
  ]
  assert len(got) == len(want)
  for a, b in zip(got, want):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.numpy(), y.numpy())


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
  assert not any(_autotunes(ds) for ds in pipelines)
