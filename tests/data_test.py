"""On-device augmentation (issue 17): data.augment_batch against the host path.

The in-step augmentation must draw bit-for-bit the crops and flips the host path
draws for the same (seed, example index), so that a run's batches (and a resumed
run's) do not depend on where augmentation runs.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import data
from ban_tf import distiller
from ban_tf import models
from tests.conftest import SHARED_TFDS


def _host(images, seed, indices, mode):
  h, w = images.shape[1:3]
  return np.stack(
    [
      tf.cast(
        data.augment_image(tf.constant(img), tf.constant([seed, int(i)], tf.int64), mode, (h, w)),
        tf.float32,
      ).numpy()
      for img, i in zip(images, indices)
    ]
  )


@pytest.mark.parametrize("mode", ["none", "crop", "flip", "flip_crop"])
@pytest.mark.parametrize("seed", [0, 7, -3, 2**40 + 5])
def test_augment_batch_equals_host_augment_image(mode, seed):
  rng = np.random.default_rng(abs(seed) % 1000)
  images = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
  # Small indices, indices around the flip seed offset, and indices above 2**32
  # (the seed's high counter word).
  indices = np.concatenate([np.arange(16), 7900 + np.arange(16), 2**32 - 8 + np.arange(16)])
  got = data.augment_batch(tf.constant(images), tf.constant(indices, tf.int64), seed, mode).numpy()
  want = _host(images, seed, indices, mode)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  if mode != "none":  # the augmentation does something: not every example is unchanged
    assert (got != images.astype(np.float32)).reshape(len(images), -1).any(1).sum() > 8


def test_stateless_bits_match_tensorflow():
  seeds = tf.constant([0, 1, 12345, 2**33 + 1], tf.int64)
  got = np.stack([b.numpy().astype(np.int64) for b in data._stateless_bits(99, seeds)[:3]], 1)  # pylint: disable=protected-access
  for row, s in zip(got, seeds.numpy()):
    want = tf.random.stateless_uniform(
      [3], seed=tf.constant([99, s], tf.int64), minval=0, maxval=2**31 - 1, dtype=tf.int32
    ).numpy()
    np.testing.assert_array_equal(row % (2**31 - 1), want)


def test_augment_batch_odd_size_single_channel():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (20, 28, 27, 1), dtype=np.uint8)
  indices = np.arange(100, 120)
  got = data.augment_batch(
    tf.constant(images), tf.constant(indices, tf.int64), 5, "flip_crop"
  ).numpy()
  np.testing.assert_array_equal(got, _host(images, 5, indices, "flip_crop"))


@pytest.fixture(scope="module")
def fmnist():
  return data.Dataset("fashion_mnist", SHARED_TFDS, train_examples=96)


def test_pipelines_give_identical_batches_from_a_resumed_epoch(fmnist):
  kw = dict(seed=3, augment="flip_crop", first_epoch=1, epochs=3)
  host, steps = fmnist.train(32, **kw)
  dev, steps_dev = fmnist.train(32, device_augment=True, **kw)
  assert steps == steps_dev == 3
  n = 0
  for (hx, hy), (dx, dy, di) in zip(host, dev):
    assert dx.dtype == tf.uint8 and di.dtype == tf.int64
    np.testing.assert_array_equal(di.numpy(), np.arange(n, n + 32) + 1 * 96)  # epoch 1 starts at 96
    np.testing.assert_array_equal(hy.numpy(), dy.numpy())
    np.testing.assert_array_equal(hx.numpy(), data.augment_batch(dx, di, 3, "flip_crop").numpy())
    n += 32
  assert n == 2 * 3 * 32


@pytest.mark.slow
def test_training_on_either_path_gives_identical_weights(fmnist):
  def fit(device):
    keras.utils.set_random_seed(0)
    student = models.build_model("tiny", 10, fmnist.info.image_shape, name="s")
    aug = functools.partial(data.augment_batch, seed=1, mode="flip_crop") if device else None
    model = distiller.Distiller(student, augment=aug)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds, steps = fmnist.train(32, seed=1, augment="flip_crop", epochs=2, device_augment=device)
    model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, shuffle=False)
    return student.get_weights()

  host, dev = fit(False), fit(True)
  for a, b in zip(host, dev):
    np.testing.assert_array_equal(a, b)
