"""tf.data input pipelines for image classification: tfds data sets or image folders.

Sources: a tfds data set by name (any split names and slices, e.g. `train[:90%]`;
any image/label feature names), or a folder DIR/{train,test[,val]}/<class>/<image>
(decoded with tf.io.decode_image, files in sorted order).
Images of varying size are resized to one size (`image_size`). With
`eval_crop` (--augment=inception) the validation and test images are instead
resized, keeping their proportions, to cover image_size / eval_crop and their
centre cut out (`_center_cropper`), as ImageNet evaluation does.

Splits: the first `num_train` examples of the train split train the model; the
validation split is a named one (`val_split`, DIR/val) or the last `num_val`
training examples (`val_examples`), and is used for any selection; the test split
is only ever evaluated, at the end of a generation.

Training data is a function of (seed, epoch) only: each epoch has its own shuffle
seed and per-example stateless augmentation seeds, so a run resumed at epoch e sees
exactly the batches an uninterrupted run would have seen.

Augmentation runs either on the host, per example in tf.data (`augment_image`), or
in the compiled train step (`augment_batch`, `device_augment=True`): the host then
only reads uint8 pixels, shuffles and batches, and sends each batch with the global
index of its examples. Both draw the same crop offsets and flips from the same
(seed, example index) and give bit-identical float32 images (tests/data_test.py).
The Inception-style random-resized crop (`augment="inception"`) draws its crop window
on the host on either path (`inception_window`, a few integers per example); the pixel
work (crop, resize, flip: `crop_resize_flip`) is integer arithmetic, so it is the same
bits on the host and in the step on any device (tests/inception_test.py).

Memory: a split whose decoded pixels fit in _CACHE_BYTES is cached in memory after its
first pass; a larger one (ImageNet at 224x224: ~193 GB) is read and decoded from its
files on every pass, and its training shuffle buffer holds at most _STREAM_SHUFFLE_BYTES
of pixels (`shuffle_buffer`). Either way the order is a function of (seed, epoch).
"""

import dataclasses
import functools
import logging
import os
import socket

from absl import logging as absl_logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from PIL import ImageOps

from ban_tf import errors
from ban_tf import tfdata

AUTOTUNE = tf.data.AUTOTUNE
_STATS_EXAMPLES = 10000  # training examples used for the per-channel mean/std
_SHUFFLE_BUFFER = 100000
# Splits whose decoded pixels exceed this are streamed from their files every epoch
# instead of being cached in memory (CIFAR-10: 153 MB; imagenette at 160 px: 0.7 GB).
_CACHE_BYTES = 4 << 30
# A streamed training split's shuffle buffer: at most this many bytes of pixels (7,133
# ImageNet images at 224x224x3). tfds writes its records in a shuffled order and a
# folder's files are put in a pseudo-random one, so a window of the stream suffices.
_STREAM_SHUFFLE_BYTES = 1 << 30
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
  """One image-classification data set with its splits, statistics and pipelines.

  Args:
    name: a tfds data set name (ignored with `image_folder`).
    data_dir: the TFDS data directory (None: tfds' default).
    train_examples: use only the first N training examples (0 = all).
    val_examples: hold out the last N training examples as validation.
    image_folder: a directory DIR with train/<class>/*, test/<class>/* and optionally
      val/<class>/* images (bmp, gif, jpeg, png); class names are the folder names.
    train_split, val_split, test_split: tfds split names, slices allowed
      ("train[:90%]", "validation"); val_split None: no named validation split.
    image_size: (H, W) to resize every image to (bilinear, rounded back to uint8
      pixels); () keeps the data set's own size, which must then be fixed.
    image_key, label_key: the tfds features holding the image and the class label
      (default "image" and "label").
    eval_crop: None, or the central fraction (0.875 for ImageNet) the validation and
      test images keep: each is resized (bilinear, antialiased, proportions kept) to
      cover image_size / eval_crop, then its centre image_size cut out; None: they are
      resized to image_size like the training images. `eval_crop_for(augment)`.

  Raises:
    errors.DataError / errors.UsageError: one line naming the fix.
  """

  def __init__(
    self,
    name,
    data_dir=None,
    *,
    train_examples=0,
    val_examples=0,
    image_folder=None,
    train_split="train",
    val_split=None,
    test_split="test",
    image_size=(),
    image_key=None,
    label_key=None,
    eval_crop=None,
  ):
    if image_folder:
      source = _folder_source(image_folder, tuple(image_size), eval_crop)
    else:
      source = _tfds_source(
        name,
        data_dir,
        train_split,
        val_split,
        test_split,
        tuple(image_size),
        image_key,
        label_key,
        eval_crop,
      )
    name, image_shape = source["name"], source["image_shape"]
    self._train_src = source["train"]
    self._test_src = source["test"]
    self._val_src = source["val"]
    total = _count(self._train_src)
    if self._val_src is not None and val_examples:
      raise errors.UsageError(
        f"--val_examples={val_examples} and a validation split ({source['val_name']}) are both given: "
        "drop one of them"
      )
    if val_examples >= total:
      raise errors.UsageError(
        f"--val_examples={val_examples} leaves no training data ({name} has {total}): use fewer"
      )
    available = total - val_examples
    if train_examples > available:
      held = f" once --val_examples={val_examples} are held out" if val_examples else ""
      raise errors.UsageError(
        f"--train_examples={train_examples} exceeds the {available} training examples of {name}{held}: "
        f"use at most {available}, or 0 for all of them"
      )
    num_train = train_examples or available
    _check_disjoint(source.get("rows"), num_train)
    if val_examples:  # the last examples of the training split, evaluated as the test split
      self._val_src = source["last"](val_examples)
    num_val = _count(self._val_src) if self._val_src is not None else 0
    mean, std = _channel_stats(
      self._train_src.take(min(num_train, _STATS_EXAMPLES)), image_shape[-1]
    )
    self.info = DataInfo(
      name=name,
      num_classes=source["num_classes"],
      image_shape=image_shape,
      class_names=source["class_names"],
      num_train=num_train,
      num_val=num_val,
      num_test=_count(self._test_src),
      mean=mean,
      std=std,
    )

  @classmethod
  def from_config(cls, cfg, data_dir=None):
    """The data set a Config (or a run's config.json as a dict) names."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return cls(
      get("dataset"),
      data_dir or get("data_dir"),
      train_examples=get("train_examples", 0),
      val_examples=get("val_examples", 0),
      image_folder=get("image_folder"),
      train_split=get("train_split") or "train",
      val_split=get("val_split"),
      test_split=get("test_split") or "test",
      image_size=tuple(get("image_size") or ()),
      image_key=get("image_key"),
      label_key=get("label_key"),
      eval_crop=eval_crop_for(get("augment")),
    )

  # ---- pipelines --------------------------------------------------------------
  def steps_per_epoch(self, batch_size):
    """Training steps per epoch (the last partial batch is dropped); builds nothing."""
    steps = self.info.num_train // batch_size
    if steps == 0:
      raise errors.UsageError(
        f"--batch_size={batch_size} exceeds the {self.info.num_train} training examples: use a smaller batch or more examples"
      )
    return steps

  def train(self, batch_size, *, seed, augment, first_epoch=0, epochs=1, device_augment=False):
    """Batches for epochs [first_epoch, epochs), drop_remainder, augmented.

    Args:
      batch_size: global batch size.
      seed: the run's seed; with the epoch it fixes the order and the augmentation.
      augment: none | crop | flip | flip_crop | inception.
      first_epoch, epochs: the epochs [first_epoch, epochs) to produce.
      device_augment: if False, elements are (float32 images [B, H, W, C] augmented
        on the host, int32 labels [B]); if True, (uint8 images [B, H, W, C] as
        stored, int32 labels [B], int64 keys), to be passed through
        `augment_batch(images, keys, seed, augment)` inside the step. The keys are
        the global example indices [B]; with inception, each example's crop window
        and flip [B, 5] (`inception_window`), drawn here from the same (seed, index).

    Returns (dataset, steps_per_epoch).
    """
    n = self.info.num_train
    steps = self.steps_per_epoch(batch_size)
    base = self._train_src.take(n)
    cached, buffer = shuffle_buffer(n, self._example_bytes(self._train_src))
    base = base.cache() if cached else base
    h, w, _ = self.info.image_shape
    per_epoch = steps * batch_size

    def shuffled(epoch):  # a Python-int seed per epoch: order depends on (seed, epoch) only
      return base.shuffle(buffer, seed=seed * 1000003 + epoch, reshuffle_each_iteration=False).take(
        per_epoch
      )

    ds = shuffled(first_epoch)
    for epoch in range(first_epoch + 1, epochs):
      ds = ds.concatenate(shuffled(epoch))
    seed = int(seed)
    ds = ds.enumerate(start=first_epoch * per_epoch)  # i = global example index
    if device_augment:
      if augment == "inception":  # the window is drawn here, the pixels are cut in the step
        ds = ds.map(
          lambda i, ex: (inception_window(tf.stack([tf.constant(seed, tf.int64), i]), (h, w)), ex),
          num_parallel_calls=AUTOTUNE,
          deterministic=True,
        )

      def split(key, example):
        return example[0], tf.cast(example[1], tf.int32), key

      ds = ds.batch(batch_size, drop_remainder=True).map(
        split, num_parallel_calls=AUTOTUNE, deterministic=True
      )
      return _distributable(ds.prefetch(AUTOTUNE)), steps

    def aug(i, example):  # i = global example index, so augmentation depends on (seed, epoch, slot)
      image, label = example
      image = augment_image(image, tf.stack([tf.constant(seed, tf.int64), i]), augment, (h, w))
      return image, tf.cast(label, tf.int32)

    ds = ds.map(aug, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_to_float, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _distributable(ds.prefetch(AUTOTUNE)), steps

  def _example_bytes(self, src):
    """Bytes of one decoded example's pixels, as stored (image_shape x the dtype's size)."""
    return int(np.prod(self.info.image_shape)) * src.element_spec[0].dtype.size

  def train_source(self):
    """The training examples as read and decoded, in their fixed order: (uint8 image
    [H, W, C], int64 label), uncached, unshuffled, unaugmented (what ban_tf.bench times)."""
    return self._train_src.take(self.info.num_train)

  def train_augmenter(self, seed, augment):
    """The in-step half of `train(device_augment=True)`: (uint8 images, keys) -> float32."""
    return functools.partial(augment_batch, seed=int(seed), mode=augment)

  def val(self, batch_size):
    """Held-out batches (images, labels, weights); see `_eval`. None without a hold-out."""
    if not self.info.num_val:
      return None
    return self._eval(self._val_src, self.info.num_val, batch_size)

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
      blank = (
        tf.zeros(self.info.image_shape, src.element_spec[0].dtype),
        tf.constant(0, tf.int32),
        tf.constant(0.0),
      )
      ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
    if n * self._example_bytes(src) <= _CACHE_BYTES:  # else read from the files each time
      ds = ds.cache()
    ds = ds.batch(batch_size).map(
      lambda x, y, w: (tf.cast(x, tf.float32), y, w), num_parallel_calls=AUTOTUNE
    )
    return _distributable(ds.prefetch(AUTOTUNE))


def shuffle_buffer(num_examples, example_bytes):
  """Whether a training split is cached in memory, and its shuffle buffer (examples).

  A split of at most _CACHE_BYTES of pixels is cached and shuffled in a buffer of up to
  _SHUFFLE_BUFFER examples (the whole of any CIFAR-sized set); a larger one is streamed
  from its files every epoch through a buffer of at most _STREAM_SHUFFLE_BYTES.

  Args:
    num_examples: the training examples (int).
    example_bytes: one example's decoded pixels in bytes (int).
  Returns:
    (cached: bool, buffer: int >= 1).
  """
  buffer = min(num_examples, _SHUFFLE_BUFFER)
  if num_examples * example_bytes <= _CACHE_BYTES:
    return True, buffer
  return False, max(1, min(buffer, _STREAM_SHUFFLE_BYTES // example_bytes))


def augment_image(image, seed, mode, size, pad=4):
  """One example's augmentation on the host.

  CIFAR (crop, flip, flip_crop): reflect-pad by `pad`, random crop back, random
  h-flip; returns the image's dtype. inception: `inception_window` then
  `crop_resize_flip`; returns float32 [size[0], size[1], C].

  Args:
    image: [H, W, C] pixels as stored (uint8).
    seed: int64 [2], (the run's seed, the example's global index).
    mode: none | crop | flip | flip_crop | inception.
    size: (H, W), the output size (the stored size).
  """
  seed = tf.cast(seed, tf.int64)
  if mode == "inception":
    window = inception_window(seed, size)
    return crop_resize_flip(image[None], window[None], size)[0]
  if mode in ("crop", "flip_crop"):
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    image = tf.image.stateless_random_crop(
      padded, (size[0], size[1], tf.shape(image)[-1]), seed=seed
    )
  if mode in ("flip", "flip_crop"):
    image = tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 7919])
  return image


# The Inception-style random-resized crop (Szegedy et al. 2015, "Going deeper with
# convolutions", section 6; TF-slim's inception_preprocessing): a window of 8%-100% of
# the image's area and aspect ratio 3/4-4/3, resized to the output size, then h-flip.
INCEPTION_AREA = (0.08, 1.0)
INCEPTION_ASPECT = (3.0 / 4.0, 4.0 / 3.0)
INCEPTION_ATTEMPTS = 10  # then the whole image
EVAL_CROP = 0.875  # the central fraction evaluation keeps (resize to 256, crop 224)
_WEIGHT_BITS = 8  # crop_resize_flip's fixed-point interpolation weights: multiples of 1/256


def eval_crop_for(augment):
  """The `Dataset(eval_crop=...)` that goes with an --augment mode: EVAL_CROP for inception."""
  return EVAL_CROP if augment == "inception" else None


def inception_window(seed, size):
  """One example's random-resized-crop window and flip, drawn from its seed.

  tf.image.stateless_sample_distorted_bounding_box (the whole image as the box, any
  overlap accepted) draws the window: its aspect ratio uniform in INCEPTION_ASPECT,
  its area a fraction INCEPTION_AREA of the image's; after INCEPTION_ATTEMPTS windows
  that do not fit it falls back to the whole image. The flip is the draw
  tf.image.stateless_random_flip_left_right makes from seed + [0, 7919] (the CIFAR
  modes' flip seed).

  Args:
    seed: int64 [2], (the run's seed, the example's global index).
    size: (H, W) of the stored image the window is cut from (static ints).
  Returns:
    int64 [5]: (top, left, height, width, flip in {0, 1}), in pixels.
  """
  seed = tf.cast(seed, tf.int64)
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.constant([size[0], size[1], 1], tf.int32),
    tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=INCEPTION_ASPECT,
    area_range=INCEPTION_AREA,
    max_attempts=INCEPTION_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  flip = tf.random.stateless_uniform([], seed=seed + [0, _FLIP_SEED_OFFSET]) < 0.5
  return tf.cast(tf.concat([begin[:2], extent[:2], tf.cast(flip, tf.int32)[None]], 0), tf.int64)


def augment_keys(seed, indices, mode, size):
  """The keys `augment_batch` takes for examples of these global indices.

  Args:
    seed: the run's seed (int). indices: int64 [B]. mode: an --augment mode.
    size: (H, W) of the stored images.
  Returns:
    int64 [B] (the indices themselves), or with inception int64 [B, 5], each index's
    `inception_window`, as `Dataset.train(device_augment=True)` sends them.
  """
  indices = tf.cast(indices, tf.int64)
  if mode != "inception":
    return indices
  return tf.map_fn(
    lambda i: inception_window(tf.stack([tf.constant(seed, tf.int64), i]), size),
    indices,
    fn_output_signature=tf.int64,
  )


def _axis_taps(start, extent, out):
  """Bilinear taps of one axis: out positions sampling [start, start + extent) of `stored`.

  Half-pixel centres, as tf.image.resize: output k samples start + (k + 0.5) * extent /
  out - 0.5, clamped to the window's edge pixels. In integers: the position is
  start + floor(q / 2out) + (q mod 2out) / 2out with q = (2k + 1) * extent - out.

  Args: start, extent: int64 [B]; out: an int. Returns (i0, i1, the weight of i1 rounded
  to a multiple of 1/2**_WEIGHT_BITS, in those units), int64 [B, out] each.
  """
  q = (2 * tf.range(out, dtype=tf.int64)[None, :] + 1) * extent[:, None] - out
  base, frac = tf.math.floordiv(q, 2 * out), tf.math.floormod(q, 2 * out)
  lo, hi = start[:, None], start[:, None] + extent[:, None] - 1
  i0 = tf.clip_by_value(start[:, None] + base, lo, hi)
  i1 = tf.clip_by_value(start[:, None] + base + 1, lo, hi)
  return i0, i1, tf.math.floordiv(frac * (1 << _WEIGHT_BITS) + out, 2 * out)


def crop_resize_flip(images, windows, size):
  """Cuts each image's window, resizes it to `size` (bilinear) and flips it if asked.

  Our own interpolation, in integer arithmetic, rather than tf.image.crop_and_resize:
  the same bits on the host (the per-example path) and in the train step on any device
  (float interpolation may differ in the last bit between a CPU and a GPU, e.g. fused
  multiply-adds), which the host/device equivalence and resume across the two paths
  need. The weights are rounded to multiples of 1/256 (at most 1/512 from
  tf.image.resize's), so a pixel differs from tf.image.resize(method="bilinear") of
  the cut window by less than 1 (of 255).

  Args:
    images: uint8 (any integer dtype) [B, H0, W0, C].
    windows: int64 [B, 5], (top, left, height, width, flip) per image (`inception_window`).
    size: (H, W), the output size.
  Returns:
    float32 [B, H, W, C], each value a multiple of 2**-16 in [0, 255].
  """
  h, w = size
  windows = tf.cast(windows, tf.int64)
  r0, r1, wr = _axis_taps(windows[:, 0], windows[:, 2], h)
  c0, c1, wc = _axis_taps(windows[:, 1], windows[:, 3], w)
  flip = tf.cast(windows[:, 4:5], tf.bool)
  c0, c1, wc = (tf.where(flip, tf.reverse(t, axis=[1]), t) for t in (c0, c1, wc))
  one = 1 << _WEIGHT_BITS
  pixels = tf.cast(images, tf.int32)

  def mix(a, b, wb, axis):  # (one - wb) * a + wb * b, broadcast along the other axes
    wb = tf.cast(wb, tf.int32)
    wb = wb[:, :, None, None] if axis == 1 else wb[:, None, :, None]
    return (one - wb) * a + wb * b

  rows = mix(
    tf.gather(pixels, r0, axis=1, batch_dims=1), tf.gather(pixels, r1, axis=1, batch_dims=1), wr, 1
  )
  out = mix(
    tf.gather(rows, c0, axis=2, batch_dims=1), tf.gather(rows, c1, axis=2, batch_dims=1), wc, 2
  )
  # < 255 * 2**16 < 2**24: exact in float32, and the power-of-two scale is exact too.
  return tf.cast(out, tf.float32) * (1.0 / (one * one))


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
  counter = (
    ones * _u64(s0 & _MASK32),
    ones * _u64(s0 >> 32),
    tf.bitwise.bitwise_and(s1, _u64(_MASK32)),
    tf.bitwise.right_shift(s1, _u64(32)),
  )
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
    indices: int64 [B], each example's global index (the host path's `i`); with
      inception, int64 [B, 5] crop windows (`inception_window`), the keys
      `Dataset.train(device_augment=True)` sends.
    seed: the run's seed (a Python int), as passed to `Dataset.train`.
    mode: none | crop | flip | flip_crop | inception.
    pad: reflection padding of the crop, as in `augment_image`.

  Returns:
    float32 [B, H, W, C], bit-identical to `augment_image` on each example.
  """
  if mode == "inception":
    return crop_resize_flip(images, indices, (images.shape[1], images.shape[2]))
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
      return tf.cast(
        tf.math.floormod(tf.math.floormod(word[:n], _u64(2**31 - 1)), _u64(2 * pad + 1)), tf.int64
      )

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
  the batches (DATA sharding); tfds' single-file splits cannot be sharded by FILE.
  Autotuning: tfdata.untuned."""
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return tfdata.untuned(ds.with_options(options))


def _to_float(images, labels):
  return tf.cast(images, tf.float32), labels


# ---- sources: (uint8 image [H, W, C], int label) datasets in a fixed order -----
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what tf.io.decode_image reads
# ... by the format Pillow finds in the header (MPO: a camera's multi-picture JPEG), whatever the name says.
_DECODABLE = {"BMP": "BMP", "GIF": "GIF", "JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}
_FOLDER_ORDER_SEED = 20180512  # the fixed order of an image folder's training files


def _resizer(size):
  """Resizes uint8 images to `size` (bilinear), rounding back to uint8 pixels."""

  def resize(image, label):
    image = tf.image.resize(image, size, method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  return resize


def _center_cropper(size, fraction):
  """Evaluation's resize and centre crop: each image is resized (bilinear, antialiased,
  its proportions kept) to the smallest size covering floor(size / fraction), e.g.
  shorter side 256 for 224 at 0.875, and its central `size` cut out, rounded back to
  uint8 pixels (tests/inception_test.py checks it against Pillow)."""
  th, tw = (int(s / fraction + 1e-9) for s in size)

  def crop(image, label):
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    scale = tf.maximum(th / shape[0], tw / shape[1])
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), tf.constant(size, tf.int32))
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    image = image[top : top + size[0], left : left + size[1]]
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  return crop


def _tfds_source(
  name, data_dir, train_split, val_split, test_split, image_size, image_key, label_key, eval_crop
):
  builder = _builder(name, data_dir)
  features = builder.info.features
  have = ", ".join(sorted(features.keys()))
  image_key = image_key or "image"
  label_key = label_key or "label"
  for flag, key, kind in (
    ("--image_key", image_key, "image"),
    ("--label_key", label_key, "class label"),
  ):
    if key not in features:
      raise errors.DataError(
        f"dataset {name!r} has no {key!r} feature (its features: {have}): pass {flag}=<its {kind} feature>"
      )
  if not isinstance(features[image_key], tfds.features.Image):
    raise errors.DataError(
      f"dataset {name!r}: feature {image_key!r} is not an image (its features: {have}): "
      "pass --image_key=<its image feature>"
    )
  if not isinstance(features[label_key], tfds.features.ClassLabel):
    raise errors.DataError(
      f"dataset {name!r}: feature {label_key!r} is not a class label (its features: "
      f"{have}): pass --label_key=<its class-label feature>"
    )
  shape = tuple(features[image_key].shape)
  if None in shape[:2] and not image_size:
    raise errors.DataError(
      f"dataset {name!r} has images of varying size {shape}: pass --image_size=H,W to resize them"
    )
  if shape[-1] is None:
    raise errors.DataError(
      f"dataset {name!r} has images with a varying number of channels: unsupported"
    )
  resize = _resizer(image_size) if image_size and tuple(image_size) != shape[:2] else None
  crop = _center_cropper(tuple(image_size) or shape[:2], eval_crop) if eval_crop else None

  def split(flag, spec, evaluated=True):
    try:
      # try_autocache=False: the pipeline caches explicitly where it wants to; tfds'
      # own cache of small sets, read partly (take), warns of a truncated cache.
      ds = builder.as_dataset(
        split=spec, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
      )
    except Exception as e:  # pylint: disable=broad-except  (tfds raises several kinds)
      raise errors.DataError(
        f"{flag}={spec!r}: not a split of {name!r} ({_short(e)}); its splits: "
        f"{', '.join(builder.info.splits) or 'none'} (slices like train[:90%] work)"
      ) from None
    ds = ds.map(
      lambda ex: (ex[image_key], ex[label_key]), num_parallel_calls=AUTOTUNE, deterministic=True
    )
    fit = crop if crop and evaluated else resize
    return ds.map(fit, num_parallel_calls=AUTOTUNE, deterministic=True) if fit else ds

  label = features[label_key]
  specs = {"train": ("--train_split", train_split), "test": ("--test_split", test_split)}
  if val_split:
    specs["val"] = ("--val_split", val_split)
  return {
    "name": name,
    "train": split("--train_split", train_split, evaluated=False),
    # --val_examples' hold-out: the last n examples of the training split, cut as evaluation
    # cuts images, read alone (a skip over the split would parse every example before them).
    "last": lambda n: _last(builder, train_split, n, lambda spec: split("--train_split", spec)),
    "test": split("--test_split", test_split),
    "val": split("--val_split", val_split) if val_split else None,
    "val_name": f"--val_split={val_split}",
    "rows": {k: (flag, spec, _split_rows(builder, spec)) for k, (flag, spec) in specs.items()},
    "num_classes": label.num_classes,
    "class_names": tuple(label.names),
    "image_shape": tuple(image_size) + shape[-1:] if image_size else shape,
  }


def _last(builder, spec, n, read):
  """The last `n` examples that the tfds split spec `spec` reads, in order: `read(split)`
  (a tf.data.Dataset) of just them when `spec` reads one file (slices of it too), else of
  `spec` with the examples before them skipped.

  Why: a skip parses every example it passes (~4 s per 60,000 fashion_mnist examples, on
  every pass over the held-out set); reading just the last ones takes ~0.1 s. Only for one
  file: tfds interleaves the files of a split as it reads them, so the last examples read
  are not the last of the last file.
  """
  files = _split_rows(builder, spec)  # None without split metadata (tfds.testing.mock_data)
  parts = ()
  if files and len(files) == 1:
    parts = tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
  if len(parts) == 1:
    end = parts[0].to
    if end is None:
      end = builder.info.splits[parts[0].splitname].num_examples
    return read(tfds.core.ReadInstruction(parts[0].splitname, from_=end - n, to=end, unit="abs"))
  ds = read(spec)
  return ds.skip(_count(ds) - n)


def _split_rows(builder, spec):
  """[(shard file, first, end)]: the examples a tfds split spec (slices too) reads, in order; None if unknown."""
  try:
    instructions = builder.info.splits[spec].file_instructions
  except Exception:  # pylint: disable=broad-except  (the overlap check is a safeguard, not a requirement)
    return None
  rows = []
  for fi in instructions:
    take = fi.take if fi.take is not None and fi.take >= 0 else fi.examples_in_shard - fi.skip
    rows.append((os.path.basename(fi.filename), fi.skip, fi.skip + take))
  return rows


def _first_rows(rows, n):
  """The first n examples of `rows` (_split_rows)."""
  out = []
  for f, a, b in rows:
    if n <= 0:
      break
    out.append((f, a, min(b, a + n)))
    n -= b - a
  return out


def _shared_rows(a, b):
  """How many examples two _split_rows lists both read."""
  return sum(max(0, min(e1, e2) - max(s1, s2)) for f1, s1, e1 in a for f2, s2, e2 in b if f1 == f2)


def _check_disjoint(rows, num_train):
  """Refuses tfds splits whose validation or test examples include training examples used (the
  first num_train of --train_split): their scores would silently be on training data."""
  if not rows or any(r[2] is None for r in rows.values()):
    return
  used = dict(rows)
  flag, spec, train_rows = rows["train"]
  used["train"] = (flag, spec, _first_rows(train_rows, num_train))
  for y in ("val", "test"):
    if y in used:
      n = _shared_rows(used["train"][2], used[y][2])
      if n:
        fy, sy, _ = used[y]
        first = (
          f" (its first {num_train} examples)"
          if num_train < sum(e - a for _, a, e in train_rows)
          else ""
        )
        fix = (
          "use disjoint slices, e.g. --train_split='train[:90%]' --val_split='train[90%:]'"
          if y == "val"
          else "use a --test_split the training examples do not include"
        )
        raise errors.DataError(
          f"{flag}={spec}{first} and {fy}={sy} share {n} examples, so {y} would score "
          f"training data: {fix}"
        )


def _folder_files(directory):
  """{class name: sorted image paths} of DIR/<class>/*; hidden files (macOS' ._x.jpg) are skipped."""
  classes = sorted(
    d
    for d in os.listdir(directory)
    if os.path.isdir(os.path.join(directory, d)) and not d.startswith(".")
  )
  return {
    c: sorted(
      os.path.join(directory, c, f)
      for f in os.listdir(os.path.join(directory, c))
      if f.lower().endswith(IMAGE_FORMATS) and not f.startswith(".")
    )
    for c in classes
  }


@dataclasses.dataclass(frozen=True)
class ImageFacts:
  """What check_image found: size (H, W) as decoded (EXIF orientation applied), whether
  the file is greyscale, whether Pillow decodes it (pil_pixels), whether it is rotated."""

  size: tuple
  grey: bool
  via_pil: bool
  rotated: bool


_EXIF_ORIENTATION = 0x0112  # 1 = upright; 5-8 swap width and height
# Pillow raises many kinds for a damaged file (OSError, SyntaxError, EOFError, ValueError,
# struct.error, ...): any of them means the file does not decode.
_PIL_ERRORS = (Exception,)


def check_image(path):
  """Checks that an image file decodes, without decoding every pixel where a cheaper check suffices.

  Per format (measured cost per file in docs/reliability.md): PNG: Image.verify()
  (every chunk's CRC up to IEND: a truncated or damaged file fails); JPEG: the header
  and the end-of-image marker (a truncated file lacks it); BMP and GIF: decoded
  (cheap; TensorFlow's decode_bmp refuses 1- and 8-bit BMPs, so Pillow decodes every
  BMP, pil_pixels). Every format: Pillow's decompression-bomb limit
  (Image.MAX_IMAGE_PIXELS x 2) on the declared size; the EXIF orientation of a JPEG
  (a rotated one is decoded by Pillow, upright).

  Returns:
    ImageFacts.
  Raises:
    errors.DataError: one line naming the file and the fix.
  """

  def fail(why):
    raise errors.DataError(f"{path}: {why}: remove or replace it")

  try:
    with Image.open(path) as im:
      fmt, (w, h), mode = im.format, im.size, im.mode
      orientation, scan = 1, 0
      if fmt in ("JPEG", "MPO"):
        scan = im.fp.tell()  # Pillow has read the markers up to the main image's scan data
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
      if fmt in ("BMP", "GIF"):
        im.load()
  except Image.DecompressionBombError as e:
    fail(f"too large to decode safely ({e})")
  except _PIL_ERRORS as e:  # Pillow raises many kinds for a damaged file
    fail(f"not a readable image ({type(e).__name__}: {str(e)[:120]})")
  if fmt not in _DECODABLE:  # tf.io.decode_image would stop the run later, with a traceback
    raise errors.DataError(
      f"{path}: a {fmt} image under an image name: convert it to PNG or JPEG, or remove it"
    )
  if fmt == "PNG":
    try:
      with Image.open(path) as im:
        im.verify()
    except _PIL_ERRORS as e:
      fail(f"a damaged PNG ({type(e).__name__}: {str(e)[:120]})")
  elif _DECODABLE[fmt] == "JPEG" and not _jpeg_ends(path, scan):
    fail("a truncated JPEG (no end-of-image marker after its image data)")
  rotated = orientation in range(2, 9)
  return ImageFacts(
    size=(w, h) if orientation in (5, 6, 7, 8) else (h, w),
    grey=mode in ("1", "L", "I", "I;16", "F"),
    via_pil=fmt == "BMP" or rotated,
    rotated=rotated,
  )


def _jpeg_ends(path, scan):
  """Whether a JPEG's image data, which starts at byte `scan`, ends with the end-of-image
  marker FF D9. Fast path: the file's last two bytes. Else (data appended after the image,
  e.g. a phone's motion-photo video) the last FF D9 must lie after `scan`: inside the
  entropy-coded data FF is always followed by 00 or a restart marker, so it is the image's
  end, not one of an earlier thumbnail's."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(size - 2, 0))
    if f.read() == b"\xff\xd9":
      return True
    f.seek(scan)
    return f.read().rfind(b"\xff\xd9") >= 0


def pil_pixels(path, channels):
  """uint8 [H, W, channels] pixels of an image file decoded by Pillow, EXIF orientation applied
  (what the folder pipeline uses for BMPs and rotated JPEGs)."""
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(im, dtype=np.uint8)
  return pixels[..., None] if channels == 1 else pixels


def _folder_source(root, image_size, eval_crop=None):
  """DIR/{train,test[,val]}/<class>/<image>; classes from train/'s folder names."""
  fix = (
    "lay it out as DIR/train/<class>/*.png and DIR/test/<class>/*.png (optional DIR/val/<class>/*)"
  )
  if not os.path.isdir(root):
    raise errors.DataError(f"--image_folder={root} does not exist: {fix}")
  files = {}
  for split in ("train", "val", "test"):
    path = os.path.join(root, split)
    if os.path.isdir(path):
      files[split] = _folder_files(path)
  for split in ("train", "test"):
    if split not in files or not any(files[split].values()):
      raise errors.DataError(f"--image_folder={root} has no images in {split}/<class>/: {fix}")
  if "val" in files and not any(files["val"].values()):  # once a traceback (a split of no files)
    raise errors.DataError(
      f"--image_folder={root}: val/ has no images in val/<class>/: add them, or remove val/ "
      "(--val_examples=N then holds out training images)"
    )
  class_names = tuple(files["train"])
  empty = [c for c, paths in files["train"].items() if not paths]
  if empty:
    raise errors.DataError(
      f"--image_folder: train/ has class folders without images ({', '.join(empty)}; "
      f"images are {', '.join(IMAGE_FORMATS)} files): add training images or remove them"
    )
  for split, per_class in files.items():
    extra = sorted(set(per_class) - set(class_names))
    if extra:
      raise errors.DataError(
        f"--image_folder: {split}/ has classes {extra} that train/ does not: "
        "give every class training images, or remove them"
      )
  # Every file is checked here, before any training, for what decoding it later needs
  # (check_image): the common size and the colour mode; which files Pillow decodes.
  sizes, grey, via_pil, rotated, shapes = set(), True, set(), [], {}
  for per_class in files.values():
    for paths in per_class.values():
      for path in paths:
        fact = check_image(path)
        sizes.add(fact.size)
        shapes[path] = fact.size
        grey = grey and fact.grey
        if fact.via_pil:
          via_pil.add(path)
        if fact.rotated:
          rotated.append(path)
  if len(class_names) < 2:
    raise errors.DataError(
      f"--image_folder={root}: train/ has one class ({class_names[0]}), so every prediction would "
      "be right: a classifier needs two or more class folders"
    )
  if rotated:
    absl_logging.warning(
      "--image_folder: %d JPEG file(s) carry an EXIF orientation (e.g. %s): read upright, as a "
      "photo viewer shows them",
      len(rotated),
      rotated[0],
    )
  if not image_size:
    if len(sizes) > 1:
      raise errors.DataError(
        f"--image_folder={root} has images of {len(sizes)} sizes (e.g. {sorted(sizes)[:2]}): "
        "pass --image_size=H,W to resize them"
      )
    image_size = next(iter(sizes))
  channels = 1 if grey else 3
  h, w = image_size
  squashed = [p for p, (ph, pw) in shapes.items() if abs(ph * w - pw * h) > 0.01 * ph * w]
  if squashed:
    absl_logging.warning(
      "--image_size=%d,%d resizes every image to exactly %dx%d (H x W) without keeping its "
      "proportions: %d of %d images have another aspect ratio (e.g. %s, %dx%d) and are squashed; "
      "crop them to %d:%d first to avoid that",
      h,
      w,
      h,
      w,
      len(squashed),
      len(shapes),
      squashed[0],
      *shapes[squashed[0]],
      h,
      w,
    )

  resize = _resizer(tuple(image_size)) if sizes != {tuple(image_size)} else None
  crop = _center_cropper(tuple(image_size), eval_crop) if eval_crop else None

  def split_ds(split, evaluated=None, last=None):
    if split not in files:
      return None
    # Files in sorted order (classes, then names). The training files are then put in
    # one fixed pseudo-random order (the same for every run and seed), so that the
    # first --train_examples, the last --val_examples and the statistics' sample mix
    # the classes as a tfds split does; Dataset.train shuffles per (seed, epoch).
    paths = [p for c in class_names for p in files[split].get(c, [])]
    labels = [i for i, c in enumerate(class_names) for _ in files[split].get(c, [])]
    if split == "train":
      order = np.random.RandomState(_FOLDER_ORDER_SEED).permutation(len(paths))
      paths, labels = [paths[i] for i in order], [labels[i] for i in order]
    if last:  # the last files only (a skip would decode every image before them)
      paths, labels = paths[-last:], labels[-last:]

    def tf_decode(path):
      return tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)

    def pil_decode(path):
      image = tf.numpy_function(
        lambda p: pil_pixels(p.decode(), channels), [path], tf.uint8, stateful=False
      )
      image.set_shape([None, None, channels])
      return image

    pil = [p in via_pil for p in paths]
    if any(pil):  # BMPs and rotated JPEGs: Pillow; the rest as before, so old runs read the same

      def decode(path, label, use_pil):
        return tf.cond(use_pil, lambda: pil_decode(path), lambda: tf_decode(path)), label

      ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int64), pil))
      ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
      ds = tf.data.Dataset.from_tensor_slices((paths, tf.constant(labels, tf.int64)))
      ds = ds.map(
        lambda path, label: (tf_decode(path), label),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
      )
    fit = crop if crop and (split != "train" if evaluated is None else evaluated) else resize
    if fit:
      ds = ds.map(fit, num_parallel_calls=AUTOTUNE, deterministic=True)
    shape = tuple(image_size) + (channels,)
    return ds.map(lambda x, y: (tf.ensure_shape(x, shape), y))

  return {
    "name": os.path.basename(os.path.normpath(root)),
    "train": split_ds("train"),
    # --val_examples' hold-out: the last n training files, cut as evaluation cuts images.
    "last": lambda n: split_ds("train", evaluated=True, last=n),
    "test": split_ds("test"),
    "val": split_ds("val"),
    "val_name": os.path.join(root, "val"),
    "num_classes": len(class_names),
    "class_names": class_names,
    "image_shape": tuple(image_size) + (channels,),
  }


def _online():
  try:
    socket.create_connection(_DOWNLOAD_PROBE, timeout=_PROBE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


class _NoUnpreparedWarning(logging.Filter):
  """Drops tfds' "Variant folder ... has no dataset_info.json" warning: an unprepared data
  set gets one `error:` line of ours (below), not a stray absl line before it."""

  def filter(self, record):
    return "has no dataset_info.json" not in record.getMessage()


def _builder(name, data_dir):
  if data_dir is not None and not os.path.isdir(data_dir):
    raise errors.DataError(
      f"--data_dir={data_dir} does not exist: point it at a prepared TFDS directory, "
      "or create it to let tfds download into it"
    )
  quiet = _NoUnpreparedWarning()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)  # tfds.builder and is_prepared() both log it
  try:
    return _open_builder(name, data_dir)
  finally:
    absl_logger.removeFilter(quiet)


def _open_builder(name, data_dir):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.DataError(
      f"unknown dataset {name!r}: pass --dataset=<a tfds image-classification name>, e.g. "
      "cifar10, cifar100, fashion_mnist, mnist, svhn_cropped"
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(
      f"dataset {name!r} could not be opened ({_short(e)}): check --dataset/--data_dir"
    ) from None
  if not builder.is_prepared():
    where = data_dir or "the default tfds directory"
    if not _online():
      raise errors.DataError(
        f"dataset {name!r} is not prepared in {where} and cannot be downloaded "
        f"({_DOWNLOAD_PROBE[0]} is unreachable): pass --data_dir pointing at a prepared "
        "TFDS directory, or run once with internet access (docs/data.md: 'tfds data sets', preparing one offline)"
      )
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise errors.DataError(
        f"dataset {name!r} is not prepared in {where} and could not be downloaded ({_short(e)}): "
        "connect to the internet once, or pass --data_dir pointing at a prepared TFDS directory "
        "(docs/data.md: 'tfds data sets', preparing one offline)"
      ) from None
  return builder


def _short(e):
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _count(ds):
  n = int(ds.cardinality())
  if n < 0:  # unknown: count once
    n = int(tfdata.untuned(ds).reduce(np.int64(0), lambda c, _: c + 1))
  return n


def _channel_stats(ds, channels):
  """Per-channel mean and std of raw pixels over the given examples (float64)."""

  def acc(state, example):
    s, s2, c = state
    x = tf.reshape(tf.cast(example[0], tf.float64), [-1, channels])
    return (
      s + tf.reduce_sum(x, 0),
      s2 + tf.reduce_sum(x * x, 0),
      c + tf.cast(tf.shape(x)[0], tf.float64),
    )

  zero = tf.zeros([channels], tf.float64)
  s, s2, c = tfdata.untuned(ds).reduce((zero, zero, tf.constant(0.0, tf.float64)), acc)
  mean = s.numpy() / c.numpy()
  var = np.maximum(s2.numpy() / c.numpy() - mean**2, 1e-6)
  return tuple(float(m) for m in mean), tuple(float(v) for v in np.sqrt(var))
