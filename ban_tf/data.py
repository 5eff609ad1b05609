"""tf.data input pipelines for any tfds image-classification data set.

Splits: the first `num_train` examples of tfds' `train` split train the model, the
last `num_val` are held out as a validation split (used for any selection), and
tfds' `test` split is only ever evaluated, at the end of a generation.

Training data is a function of (seed, epoch) only: each epoch has its own shuffle
seed and per-example stateless augmentation seeds, so a run resumed at epoch e sees
exactly the batches an uninterrupted run would have seen.

Augmentation runs either on the host, per example in tf.data (`augment_image`), or
in the compiled train step (`augment_batch`, `device_augment=True`): the host then
only reads uint8 pixels, shuffles and batches, and sends each batch with the global
index of its examples. Both draw the same crop offsets and flips from the same
(seed, example index) and give bit-identical float32 images (tests/data_test.py).
"""

import dataclasses
import functools
import os
import socket

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from ban_tf import errors

AUTOTUNE = tf.data.AUTOTUNE
_STATS_EXAMPLES = 10000  # training examples used for the per-channel mean/std
_SHUFFLE_BUFFER = 100000
# Where tfds downloads most data sets from; checked before a download is tried, so
# an offline machine fails in seconds instead of retrying for minutes.
_DOWNLOAD_PROBE = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class DataInfo:
  name: str
  num_classes: int
  image_shape: tuple
  class_names: tuple
  num_train: int
  num_val: int
  num_test: int
  mean: tuple
  std: tuple


class Dataset:
  """One tfds data set with its splits, statistics and pipelines."""

  def __init__(self, name, data_dir=None, *, train_examples=0, val_examples=0):
    self._builder = _builder(name, data_dir)
    features = self._builder.info.features
    if "image" not in features or "label" not in features:
      raise errors.DataError(
          f"dataset {name!r} has no 'image'/'label' features: use an image-classification data set")
    image_shape = tuple(features["image"].shape)
    if None in image_shape:
      raise errors.DataError(
          f"dataset {name!r} has images of varying size {image_shape}: only fixed-size images are supported")
    splits = self._builder.info.splits
    if splits and "test" not in splits:
      raise errors.DataError(f"dataset {name!r} has no 'test' split (it has {', '.join(splits)})")
    self._train_src = self._split("train")
    self._test_src = self._split("test")
    total = _count(self._train_src)
    if val_examples >= total:
      raise errors.UsageError(
          f"--val_examples={val_examples} leaves no training data ({name} has {total}): use fewer")
    available = total - val_examples
    num_train = min(train_examples, available) if train_examples else available
    num_classes = features["label"].num_classes
    names = tuple(features["label"].names) if hasattr(features["label"], "names") else ()
    mean, std = _channel_stats(self._train_src.take(min(num_train, _STATS_EXAMPLES)), image_shape[-1])
    self.info = DataInfo(
        name=name, num_classes=num_classes, image_shape=image_shape, class_names=names,
        num_train=num_train, num_val=val_examples, num_test=_count(self._test_src),
        mean=mean, std=std)
    self._val_start = total - val_examples

  def _split(self, split):
    ds = self._builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    return ds

  # ---- pipelines --------------------------------------------------------------
  def steps_per_epoch(self, batch_size):
    """Training steps per epoch (the last partial batch is dropped); builds nothing."""
    steps = self.info.num_train // batch_size
    if steps == 0:
      raise errors.UsageError(
          f"--batch_size={batch_size} exceeds the {self.info.num_train} training examples: use a smaller batch or more examples")
    return steps

  def train(self, batch_size, *, seed, augment, first_epoch=0, epochs=1, device_augment=False):
    """Batches for epochs [first_epoch, epochs), drop_remainder, augmented.

    Args:
      batch_size: global batch size.
      seed: the run's seed; with the epoch it fixes the order and the augmentation.
      augment: none | crop | flip | flip_crop.
      first_epoch, epochs: the epochs [first_epoch, epochs) to produce.
      device_augment: if False, elements are (float32 images [B, H, W, C] augmented
        on the host, int32 labels [B]); if True, (uint8 images [B, H, W, C] as
        stored, int32 labels [B], int64 global example indices [B]), to be passed
        through `augment_batch(images, indices, seed, augment)` inside the step.

    Returns (dataset, steps_per_epoch).
    """
    n = self.info.num_train
    steps = self.steps_per_epoch(batch_size)
    base = self._train_src.take(n).cache()
    h, w, _ = self.info.image_shape
    per_epoch = steps * batch_size

    def shuffled(epoch):  # a Python-int seed per epoch: order depends on (seed, epoch) only
      return base.shuffle(min(n, _SHUFFLE_BUFFER), seed=seed * 1000003 + epoch,
                          reshuffle_each_iteration=False).take(per_epoch)

    ds = shuffled(first_epoch)
    for epoch in range(first_epoch + 1, epochs):
      ds = ds.concatenate(shuffled(epoch))
    seed = int(seed)
    ds = ds.enumerate(start=first_epoch * per_epoch)  # i = global example index
    if device_augment:
      def split(i, example):
        return example[0], tf.cast(example[1], tf.int32), i
      ds = ds.batch(batch_size, drop_remainder=True).map(split, num_parallel_calls=AUTOTUNE,
                                                         deterministic=True)
      return _distributable(ds.prefetch(AUTOTUNE)), steps

    def aug(i, example):  # i = global example index, so augmentation depends on (seed, epoch, slot)
      image, label = example
      image = augment_image(image, tf.stack([tf.constant(seed, tf.int64), i]), augment, (h, w))
      return image, tf.cast(label, tf.int32)

    ds = ds.map(aug, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _distributable(ds.prefetch(AUTOTUNE)), steps

  def train_augmenter(self, seed, augment):
    """The in-step half of `train(device_augment=True)`: (uint8 images, indices) -> float32."""
    return functools.partial(augment_batch, seed=int(seed), mode=augment)

  def val(self, batch_size):
    if not self.info.num_val:
      return None
    return self._eval(self._train_src.skip(self._val_start), batch_size)

  def test(self, batch_size):
    return self._eval(self._test_src, batch_size)

  def _eval(self, src, batch_size):
    ds = src.map(lambda x, y: (x, tf.cast(y, tf.int32))).cache()
    ds = ds.batch(batch_size).map(_to_float, num_parallel_calls=AUTOTUNE)
    return _distributable(ds.prefetch(AUTOTUNE))

  def test_labels(self):
    return np.concatenate([y.numpy() for _, y in self._test_src.batch(4096)])


def augment_image(image, seed, mode, size, pad=4):
  """CIFAR augmentation: reflect-pad by `pad`, random crop back, random h-flip."""
  seed = tf.cast(seed, tf.int64)
  if mode in ("crop", "flip_crop"):
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(padded, (size[0], size[1], tf.shape(image)[-1]), seed=seed)
  if mode in ("flip", "flip_crop"):
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 7919])
  return image


# Philox-4x32-10 (Salmon et al. 2011), the generator behind TensorFlow's stateless
# random ops on CPU and GPU. tf.image.stateless_random_crop/flip take one seed per
# call and tf.vectorized_map falls back to a sequential loop for them (pfor.py), so
# `augment_batch` evaluates the same generator for a whole batch of seeds with
# element-wise uint64 ops (a 32 x 32-bit product fits in 64 bits), bit-identical to
# TF's draws (tests/data_test.py checks them against tf.random.stateless_uniform).
# Our own code because the equivalence with the host path (and so resume exactness
# across the two paths) needs the exact bits. About 200 small ops: few, because each
# one adds to the tracing time of every generation's train step.
_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_SEED_KEY = (0x3EC8F720, 0x02461E29)  # TF's key for turning a seed into (key, counter)
_FLIP_SEED_OFFSET = 7919  # augment_image's flip seed is seed + [0, 7919]


def _u64(value):
  return tf.constant(value, tf.uint64)


def _philox(counter, key):
  """One Philox-4x32-10 block: 4 counter words and 2 key words (uint64 tensors < 2**32)."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  xor, low = tf.bitwise.bitwise_xor, lambda x: tf.bitwise.bitwise_and(x, _u64(_MASK32))
  for r in range(10):
    p0, p1 = c0 * _u64(_PHILOX_M[0]), c2 * _u64(_PHILOX_M[1])
    hi0, hi1 = tf.bitwise.right_shift(p0, _u64(32)), tf.bitwise.right_shift(p1, _u64(32))
    c0, c1, c2, c3 = xor(xor(hi1, c1), k0), low(p1), xor(xor(hi0, c3), k1), low(p0)
    if r < 9:
      k0, k1 = low(k0 + _u64(_PHILOX_W[0])), low(k1 + _u64(_PHILOX_W[1]))
  return c0, c1, c2, c3


def _stateless_bits(seed0, seed1):
  """The first 4 uint32 (as uint64 [N]) that a TF stateless op seeded [seed0, seed1] draws.

  seed0: a Python int; seed1: int64 [N]. Mirrors StatelessRandomGetKeyCounter
  (the seed is scrambled by one Philox block into a key and a counter).
  """
  s1 = tf.cast(seed1, tf.uint64)  # two's complement, as TF reads an int64 seed
  s0 = seed0 & 0xFFFFFFFFFFFFFFFF
  ones = tf.ones_like(s1)
  counter = (ones * _u64(s0 & _MASK32), ones * _u64(s0 >> 32),
             tf.bitwise.bitwise_and(s1, _u64(_MASK32)), tf.bitwise.right_shift(s1, _u64(32)))
  mix = _philox(counter, (ones * _u64(_SEED_KEY[0]), ones * _u64(_SEED_KEY[1])))
  zero = tf.zeros_like(s1)
  return _philox((zero, zero, mix[2], mix[3]), (mix[0], mix[1]))


def _reflect(q, pad, size):
  """Index into the unpadded axis of a REFLECT-padded index q in [0, size + 2 * pad)."""
  r = tf.abs(q - pad)
  return (size - 1) - tf.abs((size - 1) - r)


def augment_batch(images, indices, seed, mode, pad=4):
  """`augment_image` for a whole batch, vectorised: what the train step runs on device.

  Args:
    images: uint8 (or any real dtype) [B, H, W, C], as stored.
    indices: int64 [B], each example's global index (the host path's `i`).
    seed: the run's seed (a Python int), as passed to `Dataset.train`.
    mode: none | crop | flip | flip_crop.
    pad: reflection padding of the crop, as in `augment_image`.

  Returns:
    float32 [B, H, W, C], bit-identical to `augment_image` on each example.
  """
  images = tf.cast(images, tf.float32)
  if mode not in ("crop", "flip", "flip_crop"):
    return images
  h, w = images.shape[1], images.shape[2]
  indices = tf.cast(indices, tf.int64)
  n = tf.shape(indices)[0]
  # One generator pass for both draws: the crop's seed [seed, i], the flip's [seed, i + 7919].
  bits = _stateless_bits(int(seed), tf.concat([indices, indices + _FLIP_SEED_OFFSET], 0))
  rows = tf.broadcast_to(tf.range(h, dtype=tf.int64)[None, :], [n, h])
  cols = tf.broadcast_to(tf.range(w, dtype=tf.int64)[None, :], [n, w])
  if mode in ("crop", "flip_crop"):
    # stateless_random_crop: uniform int32 in [0, 2**31 - 1) per axis, mod (2 * pad + 1).
    def offset(word):
      return tf.cast(tf.math.floormod(tf.math.floormod(word[:n], _u64(2 ** 31 - 1)), _u64(2 * pad + 1)),
                     tf.int64)
    rows = _reflect(offset(bits[0])[:, None] + rows, pad, h)
    cols = _reflect(offset(bits[1])[:, None] + cols, pad, w)
  if mode in ("flip", "flip_crop"):
    # stateless_random_flip_left_right: flips when its float32 uniform u < 0.5, i.e.
    # when bit 22 (the top mantissa bit) of the first draw is 0.
    flip = tf.equal(tf.bitwise.bitwise_and(bits[0][n:], _u64(1 << 22)), _u64(0))
    cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
  images = tf.gather(images, rows, axis=1, batch_dims=1)
  return tf.gather(images, cols, axis=2, batch_dims=1)


def _distributable(ds):
  """Multi-worker input: every worker builds the same pipeline and keeps its share of
  the batches (DATA sharding); tfds' single-file splits cannot be sharded by FILE."""
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return ds.with_options(options)


def _to_float(images, labels):
  return tf.cast(images, tf.float32), labels


def _online():
  try:
    socket.create_connection(_DOWNLOAD_PROBE, timeout=_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def _builder(name, data_dir):
  if data_dir is not None and not os.path.isdir(data_dir):
    raise errors.DataError(
        f"--data_dir={data_dir} does not exist: point it at a prepared TFDS directory, "
        "or create it to let tfds download into it")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.DataError(
        f"unknown dataset {name!r}: pass --dataset=<a tfds image-classification name>, e.g. "
        "cifar10, cifar100, fashion_mnist, mnist, svhn_cropped") from None
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(f"dataset {name!r} could not be opened ({_short(e)}): check --dataset/--data_dir") from None
  if not builder.is_prepared():
    where = data_dir or "the default tfds directory"
    if not _online():
      raise errors.DataError(
          f"dataset {name!r} is not prepared in {where} and cannot be downloaded "
          f"({_DOWNLOAD_PROBE[0]} is unreachable): pass --data_dir pointing at a prepared "
          "TFDS directory, or run once with internet access")
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise errors.DataError(
          f"dataset {name!r} is not prepared in {where} and could not be downloaded ({_short(e)}): "
          "connect to the internet once, or pass --data_dir pointing at a prepared TFDS directory") from None
  return builder


def _short(e):
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _count(ds):
  n = int(ds.cardinality())
  if n < 0:  # unknown: count once
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  return n


def _channel_stats(ds, channels):
  """Per-channel mean and std of raw pixels over the given examples (float64)."""
  def acc(state, example):
    s, s2, c = state
    x = tf.reshape(tf.cast(example[0], tf.float64), [-1, channels])
    return s + tf.reduce_sum(x, 0), s2 + tf.reduce_sum(x * x, 0), c + tf.cast(tf.shape(x)[0], tf.float64)
  zero = tf.zeros([channels], tf.float64)
  s, s2, c = ds.reduce((zero, zero, tf.constant(0.0, tf.float64)), acc)
  mean = s.numpy() / c.numpy()
  var = np.maximum(s2.numpy() / c.numpy() - mean ** 2, 1e-6)
  return tuple(float(m) for m in mean), tuple(float(v) for v in np.sqrt(var))
