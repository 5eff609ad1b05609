"""ImageNet-style data (issue 24): --augment=inception.

Training: the Inception-style random-resized crop + flip (data.inception_window,
data.crop_resize_flip), on the host or in the train step, bit-identical and a function
of (seed, example index) only. Evaluation: resize (proportions kept) + centre crop
(data.EVAL_CROP), checked against Pillow on variable-size JPEGs (a custom tfds mock, so
the pixels are known). tfds' own mock of imagenette through main.run. Splits larger
than the cache budget stream from their source in the same order.
"""

import io
import json
import os

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from ban_tf import data
from ban_tf import distiller
from ban_tf import main
from ban_tf import models
from tests.conftest import SHARED_TFDS
from tests.conftest import strategy_for


def parse(*argv):
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf.main", *argv])
  return main.config_from_flags(fv)


def _windows(seed, indices, size):
  ds = tf.data.Dataset.from_tensor_slices(tf.constant(indices, tf.int64))
  ds = ds.map(lambda i: data.inception_window(tf.stack([tf.constant(seed, tf.int64), i]), size))
  return np.concatenate([w.numpy() for w in ds.batch(4096)])


def test_crop_statistics():
  size = (64, 48)
  w = _windows(5, np.arange(3000), size)
  top, left, h, wd, flip = w.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= size[0]).all() and (left + wd <= size[1]).all()
  area = h * wd / (size[0] * size[1])
  assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
  assert area.min() < 0.12 and area.max() > 0.9  # the whole scale range is drawn
  assert np.median(area) < 0.7  # not a fixed crop of the whole image
  aspect = wd / h  # rounding to whole pixels moves it by at most one pixel's worth
  assert (aspect >= 0.75 * (1 - 1 / h.clip(1))).all() and (aspect <= 4 / 3 * (1 + 1 / h)).all()
  assert aspect.min() < 0.8 and aspect.max() > 1.25
  assert set(np.unique(flip)) == {0, 1} and 0.46 < flip.mean() < 0.54  # 3000 draws: sd 0.009
  # Different examples, different windows; different seeds, different windows.
  assert len({tuple(r) for r in w}) > 2500
  assert (w != _windows(6, np.arange(3000), size)).any(1).mean() > 0.9


def test_window_falls_back_to_the_whole_image():
  # A 1 x 40 image has no window of aspect 3/4..4/3 covering >= 8% of it.
  w = _windows(1, np.arange(50), (1, 40))
  np.testing.assert_array_equal(w[:, :4], np.tile([0, 0, 1, 40], (50, 1)))


def test_augment_image_output_and_resize_against_tf_image_resize():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
  seed = tf.constant([3, 11], tf.int64)
  out = data.augment_image(tf.constant(image), seed, "inception", (40, 36)).numpy()
  assert out.shape == (40, 36, 3) and out.dtype == np.float32
  y, x, h, w, flip = data.inception_window(seed, (40, 36)).numpy()
  # Independent: TensorFlow's float bilinear resize of the cut window.
  want = tf.image.resize(image[y : y + h, x : x + w].astype(np.float32), (40, 36)).numpy()
  want = want[:, ::-1] if flip else want
  assert np.abs(out - want).max() < 1.0
  # The whole window at its own size is the image itself (flipped or not).
  same = data.crop_resize_flip(image[None], tf.constant([[0, 0, 40, 36, 1]]), (40, 36))
  np.testing.assert_array_equal(same.numpy()[0], image[:, ::-1].astype(np.float32))


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 5])
def test_augment_batch_equals_host_augment_image(seed):
  rng = np.random.default_rng(seed % 1000)
  images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
  indices = np.concatenate([np.arange(8), 7900 + np.arange(8), 2**32 - 4 + np.arange(8)])
  keys = _windows(seed, indices, (32, 32))
  got = data.augment_batch(tf.constant(images), tf.constant(keys), seed, "inception").numpy()
  want = np.stack(
    [
      data.augment_image(tf.constant(im), tf.constant([seed, i], tf.int64), "inception", (32, 32))
      for im, i in zip(images, indices)
    ]
  )
  np.testing.assert_array_equal(got, want)
  assert (got != images.astype(np.float32)).reshape(24, -1).any(1).sum() > 12


def test_augment_keys_are_the_windows_the_pipeline_sends():
  keys = data.augment_keys(3, tf.range(5, 9), "inception", (28, 28)).numpy()
  np.testing.assert_array_equal(keys, _windows(3, np.arange(5, 9), (28, 28)))
  np.testing.assert_array_equal(data.augment_keys(3, tf.range(4), "flip_crop", (28, 28)), range(4))


@pytest.fixture(scope="module")
def fmnist():
  return data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_examples=96, eval_crop=data.eval_crop_for("inception")
  )


def _batches(ds):
  return [tuple(t.numpy() for t in b) for b in ds]


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.slow
def test_host_and_device_pipelines_identical_from_a_resumed_epoch(fmnist, replicas):
  """train(device_augment=False) == augment_batch in the step, per replica; epoch 1 of a
  resumed run (first_epoch=1) == epoch 1 of an uninterrupted one."""
  whole = _batches(fmnist.train(32, seed=3, augment="inception", epochs=2)[0])
  host = _batches(fmnist.train(32, seed=3, augment="inception", first_epoch=1, epochs=2)[0])
  assert len(whole) == 6 and len(host) == 3
  for a, b in zip(whole[3:], host):  # resume: the same draws for the same (seed, epoch, example)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert host[0][0].dtype == np.float32 and host[0][0].shape == (32, 28, 28, 1)
  dev, _ = fmnist.train(
    32, seed=3, augment="inception", first_epoch=1, epochs=2, device_augment=True
  )
  strategy = strategy_for(replicas)
  aug = fmnist.train_augmenter(3, "inception")
  step = tf.function(aug)
  n = 0
  for (hx, hy), (x, y, k) in zip(host, strategy.experimental_distribute_dataset(dev)):
    dx = strategy.gather(strategy.run(step, (x, k)), 0)  # each replica augments its share
    np.testing.assert_array_equal(hx, dx.numpy())
    np.testing.assert_array_equal(hy, strategy.gather(y, 0).numpy())
    n += 1
  assert n == 3
  other = _batches(fmnist.train(32, seed=4, augment="inception", first_epoch=1, epochs=2)[0])
  assert not np.array_equal(other[0][0], host[0][0])


@pytest.mark.slow
def test_training_on_either_path_gives_identical_weights(fmnist):
  def fit(device):
    keras.utils.set_random_seed(0)
    student = models.build_model("tiny", 10, fmnist.info.image_shape, name="s")
    aug = fmnist.train_augmenter(1, "inception") if device else None
    model = distiller.Distiller(student, augment=aug)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    ds, steps = fmnist.train(32, seed=1, augment="inception", epochs=1, device_augment=device)
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return student.get_weights()

  for a, b in zip(fit(False), fit(True)):
    np.testing.assert_array_equal(a, b)


def test_shuffle_buffer_caches_what_fits_and_streams_the_rest():
  cifar = 32 * 32 * 3
  assert data.shuffle_buffer(50000, cifar) == (True, 50000)  # cached, shuffled whole
  assert data.shuffle_buffer(200000, cifar) == (True, 100000)
  # ImageNet at 224 px (1.28M x 150,528 bytes, ~193 GB): streamed, a 1 GiB buffer.
  assert data.shuffle_buffer(1281167, 224 * 224 * 3) == (False, (1 << 30) // (224 * 224 * 3))
  assert data.shuffle_buffer(10, 1 << 40) == (False, 1)


def _counted(ds):
  """`ds` with a counter of the examples read from it (a Python side effect per read)."""
  reads = []

  def tick(x, y):
    n = tf.py_function(lambda: reads.append(1) or 0, [], tf.int32)
    with tf.control_dependencies([n]):
      return tf.identity(x), y

  return ds.map(tick), reads


@pytest.mark.slow
def test_a_split_larger_than_the_cache_budget_streams_in_the_same_order(monkeypatch):
  """Over _CACHE_BYTES the training split is re-read every epoch (not cached) and, with a
  buffer as large as the cached one, the batches are the same, also from a resumed epoch,
  on the host and the device-augment path alike."""
  ds = data.Dataset("fashion_mnist", SHARED_TFDS, train_examples=64)
  ds._train_src, reads = _counted(ds._train_src)
  for device in (False, True):
    kw = dict(seed=5, augment="inception", epochs=3, device_augment=device)
    monkeypatch.setattr(data, "_CACHE_BYTES", 4 << 30)
    del reads[:]
    cached = _batches(ds.train(16, **kw)[0])
    assert len(reads) == 64  # read once, then served from memory
    monkeypatch.setattr(data, "_CACHE_BYTES", 64 * 28 * 28 - 1)
    del reads[:]
    streamed = _batches(ds.train(16, **kw)[0])
    assert len(reads) == 3 * 64  # every epoch from the source
    resumed = _batches(ds.train(16, **kw, first_epoch=2)[0])
    assert len(cached) == len(streamed) == 12 and len(resumed) == 4
    for a, b in zip(cached + cached[8:], streamed + resumed):
      for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    monkeypatch.setattr(data, "_STREAM_SHUFFLE_BYTES", 8 * 28 * 28)  # an 8-example window
    small = _batches(ds.train(16, **kw)[0])
    monkeypatch.undo()
    assert not np.array_equal(small[0][1], cached[0][1])  # another order of the same examples
    assert sorted(np.concatenate([b[1] for b in small[:4]])) == sorted(
      np.concatenate([b[1] for b in cached[:4]])
    )


def _pil_center_crop(pixels, size, fraction=0.875):
  """Independent reference: Pillow's bilinear (antialiased) resize + centre crop."""
  h, w = pixels.shape[:2]
  th, tw = (int(s / fraction + 1e-9) for s in size)
  scale = max(th / h, tw / w)
  nh, nw = max(round(h * scale), size[0]), max(round(w * scale), size[1])
  im = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
  out = np.asarray(im.resize((nw, nh), Image.BILINEAR)).reshape(nh, nw, -1)
  top, left = (nh - size[0]) // 2, (nw - size[1]) // 2
  return out[top : top + size[0], left : left + size[1]]


def test_held_out_validation_examples_are_centre_cropped_like_the_test_split():
  """--val_examples holds out the last training examples: with inception they are
  evaluated as the test split is (resize + centre crop), not as training stores them."""
  kw = dict(train_split="train[:40]", val_examples=8)  # a slice: skip() reads 32, not 60,000
  ds = data.Dataset("fashion_mnist", SHARED_TFDS, eval_crop=data.EVAL_CROP, **kw)
  raw = data.Dataset("fashion_mnist", SHARED_TFDS, **kw)
  got = np.concatenate([x.numpy() for x, _, _ in ds.val(8)])
  stored = np.concatenate([x.numpy() for x, _, _ in raw.val(8)])  # the 28x28 images as stored
  assert got.shape == stored.shape == (8, 28, 28, 1)
  for k in range(8):  # resized to 32x32 (28 / 0.875), the central 28x28 kept
    want = _pil_center_crop(stored[k].astype(np.uint8), (28, 28)).astype(np.float32)
    assert np.abs(got[k] - want).max() <= 1.0, k
  assert np.abs(got - stored).mean() > 2.0  # not the stored images


def _jpeg(pixels):
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _fake_imagenette(sizes, seed):
  """Variable-size JPEGs (smooth, so that they compress like photos) and their labels."""
  rng = np.random.default_rng(seed)
  files = []
  for k, (h, w) in enumerate(sizes):
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    pixels = (base + 60 * np.sin(yy[..., None] / (3 + k % 5) + xx[..., None] / 7.0)) % 256
    files.append((_jpeg(pixels.astype(np.uint8)), k % 10))
  return files


def _mock_as_dataset(splits):
  def as_dataset(self, split, **kwargs):
    del self, kwargs
    files = splits[str(split).split("[")[0]]
    ds = tf.data.Dataset.from_tensor_slices(
      ([f for f, _ in files], np.array([y for _, y in files], np.int64))
    )
    return ds.map(lambda f, y: {"image": tf.io.decode_jpeg(f, channels=3), "label": y})

  return as_dataset


_SIZES = {  # landscape, portrait, smaller and larger than 32 / 0.875 = 36
  "train": [(20 + 7 * k % 41, 25 + 11 * k % 37) for k in range(40)],
  "validation": [(48, 64), (64, 40), (30, 33), (27, 20), (36, 36), (100, 75), (41, 57), (33, 90)],
}


@pytest.fixture(scope="module")
def imagenette_files():
  return {split: _fake_imagenette(sizes, i) for i, (split, sizes) in enumerate(_SIZES.items())}


def test_eval_center_crop_golden_against_pillow(imagenette_files, monkeypatch):
  monkeypatch.setattr(data, "_online", lambda: True)
  with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset(imagenette_files)):
    ds = data.Dataset(
      "imagenette/160px-v2",
      test_split="validation",
      image_size=(32, 32),
      eval_crop=data.eval_crop_for("inception"),
    )
    got = np.concatenate([x.numpy() for x, _, _ in ds.test(8)])
    squashed = data.Dataset("imagenette/160px-v2", test_split="validation", image_size=(32, 32))
    plain = np.concatenate([x.numpy() for x, _, _ in squashed.test(8)])
  assert got.shape == (8, 32, 32, 3) and ds.info.num_test == 8
  for k, (jpeg, _) in enumerate(imagenette_files["validation"]):
    pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy()  # the pixels the mock hands on
    want = _pil_center_crop(pixels, (32, 32)).astype(np.float32)
    diff = np.abs(got[k] - want)
    assert diff.max() <= 1.0 and diff.mean() < 0.3, (k, pixels.shape, diff.max())  # rounding
  # Without eval_crop every test image is squashed to 32x32 instead: not the same pixels.
  assert np.abs(plain - got).mean() > 2.0


def test_inception_is_an_augment_flag_value():
  cfg = parse("--augment=inception", "--image_size=32,32")
  cfg.validate()  # raises errors.UsageError for an --augment it does not know
  assert cfg.resolved_augment == "inception"
  assert data.eval_crop_for(cfg.resolved_augment) == 0.875
  assert data.eval_crop_for(parse().resolved_augment) is None  # the CIFAR default: unchanged


def test_resume_with_another_augment_is_refused():
  """--augment changes what is trained: a rerun that changes it is another experiment
  (rundir refuses a run directory whose config.json differs in it)."""
  stored = parse("--augment=flip_crop").to_dict()
  assert parse("--augment=inception").experiment_diff(stored) == ["augment", "resolved"]
  assert parse("--augment=flip_crop").experiment_diff(stored) == []


@pytest.mark.slow
def test_mock_imagenette_end_to_end(monkeypatch, tmp_path):
  """A tiny run on tfds' own mock of imagenette (tfds.testing.mock_data: random images of
  random sizes 5..49 px through the builder's as_dataset and feature decoding, as a user's
  tfds.load): inception training in the step, resize + centre-crop evaluation."""
  monkeypatch.setattr(data, "_online", lambda: True)  # the mock is not "prepared"
  cut, centred = [], []
  real_cut, real_centre = data.crop_resize_flip, data._center_cropper
  monkeypatch.setattr(data, "crop_resize_flip", lambda *a: cut.append(a[1].shape) or real_cut(*a))
  monkeypatch.setattr(data, "_center_cropper", lambda *a: centred.append(a) or real_centre(*a))
  run_dir = str(tmp_path / "run")
  cfg = parse(
    "--dataset=imagenette/160px-v2",
    "--test_split=validation",
    "--image_size=32,32",
    "--augment=inception",
    "--arch=tiny",
    "--gens=0",
    "--epochs=1",
    "--batch_size=8",
    f"--run_dir={run_dir}",
    "--verbose=0",
  )
  with tfds.testing.mock_data(num_examples=24):
    main.run(cfg)
  assert cut and cut[0][-1] == 5  # the step cut (top, left, height, width, flip) windows
  assert centred == [((32, 32), data.EVAL_CROP)]  # the test split: resize + centre crop
  stored = json.load(open(os.path.join(run_dir, "config.json")))
  assert stored["augment"] == stored["resolved"]["augment"] == "inception"
  history = json.load(open(os.path.join(run_dir, "gen_0", "history.json")))
  assert [h["epoch"] for h in history] == [1]
  assert os.path.exists(os.path.join(run_dir, "gen_0", "DONE"))
  results = open(os.path.join(run_dir, "results.md")).read()
  assert "24 train / 0 val / 24 test examples; Inception-style random-resized crop" in results
