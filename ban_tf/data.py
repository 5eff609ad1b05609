"""tf.data input pipelines for any tfds image-classification data set.

Splits: the first `num_train` examples of tfds' `train` split train the model, the
last `num_val` are held out as a validation split (used for any selection), and
tfds' `test` split is only ever evaluated, at the end of a generation.

Training data is a function of (seed, epoch) only: each epoch has its own shuffle
seed and per-example stateless augmentation seeds, so a run resumed at epoch e sees
exactly the batches an uninterrupted run would have seen.
"""

import dataclasses
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

  def train(self, batch_size, *, seed, augment, first_epoch=0, epochs=1):
    """Batches for epochs [first_epoch, epochs), drop_remainder, augmented.

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

    def aug(i, example):  # i = global example index, so augmentation depends on (seed, epoch, slot)
      image, label = example
      image = augment_image(image, tf.stack([tf.constant(seed, tf.int64), i]), augment, (h, w))
      return image, tf.cast(label, tf.int32)

    ds = ds.enumerate(start=first_epoch * per_epoch).map(aug, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _distributable(ds.prefetch(AUTOTUNE)), steps

  def val(self, batch_size):
    """Held-out batches (images, labels, weights); see `_eval`. None without a hold-out."""
    if not self.info.num_val:
      return None
    return self._eval(self._train_src.skip(self._val_start), self.info.num_val, batch_size)

  def test(self, batch_size):
    """Test batches (images, labels, weights); see `_eval`."""
    return self._eval(self._test_src, self.info.num_test, batch_size)

  def _eval(self, src, n, batch_size):
    """Every one of the `n` examples once, in order, as (images, labels, weights).

    weights is 1.0 for an example and 0.0 for padding: the last batch is padded with
    black, label-0 images to a full `batch_size`, so that under tf.distribute every
    replica gets a share of every batch (an empty per-replica batch crashes oneDNN's
    convolutions). Metrics weight by it (Distiller.test_step, evaluate.accuracy), so
    the padding changes no number.
    """
    ds = src.map(lambda x, y: (x, tf.cast(y, tf.int32), tf.constant(1.0)))
    pad = -n % batch_size
    if pad:
      blank = (tf.zeros(self.info.image_shape, src.element_spec[0].dtype), tf.constant(0, tf.int32),
               tf.constant(0.0))
      ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
    ds = ds.cache().batch(batch_size).map(lambda x, y, w: (tf.cast(x, tf.float32), y, w),
                                          num_parallel_calls=AUTOTUNE)
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
