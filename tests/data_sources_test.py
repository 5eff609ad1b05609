"""Data sources: image folders, tfds split names and slices, resizing, feature keys."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from ban_tf import data
from ban_tf import errors
from ban_tf import evaluate
from ban_tf import main
from tests.conftest import SHARED_TFDS

CLASSES = ("cat", "dog", "emu")  # folder names, sorted: labels 0, 1, 2
_HAS_TFDS = pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")),
  reason="needs the prepared fashion_mnist in shared/",
)


def write_folder(
  root, counts=(("train", 8), ("val", 2), ("test", 3)), size=(10, 12), mode="RGB", ext=".png"
):
  """DIR/<split>/<class>/<i>.png with random pixels; returns {(split, class, i): array}."""
  rng = np.random.RandomState(0)
  written = {}
  for split, n in counts:
    for c in CLASSES:
      os.makedirs(os.path.join(root, split, c), exist_ok=True)
      for i in range(n):
        shape = size + ((3,) if mode == "RGB" else ())
        pixels = rng.randint(0, 256, shape).astype(np.uint8)
        Image.fromarray(pixels, mode).save(os.path.join(root, split, c, f"{i:03d}{ext}"))
        written[(split, c, i)] = pixels
  return written


def _all(ds):
  """Every example of an evaluation pipeline: (images, labels[, weights]), padding (weight 0) dropped."""
  xs, ys = [], []
  for batch in ds:
    keep = batch[2].numpy() > 0 if len(batch) > 2 else slice(None)
    xs.append(batch[0].numpy()[keep])
    ys.append(batch[1].numpy()[keep])
  return np.concatenate(xs), np.concatenate(ys)


def test_image_folder_classes_counts_and_pixels(tmp_path):
  written = write_folder(str(tmp_path / "pets"))
  ds = data.Dataset(None, image_folder=str(tmp_path / "pets"))
  info = ds.info
  assert (info.name, info.class_names, info.num_classes) == ("pets", CLASSES, 3)
  assert (info.num_train, info.num_val, info.num_test, info.image_shape) == (24, 6, 9, (10, 12, 3))
  # Test split: sorted by class, then file name; exact pixels and labels.
  x, y = _all(ds.test(4))
  assert x.dtype == np.float32 and x.shape == (9, 10, 12, 3)
  np.testing.assert_array_equal(y, np.repeat([0, 1, 2], 3))
  want = np.stack([written[("test", c, i)] for c in CLASSES for i in range(3)])
  np.testing.assert_array_equal(x, want.astype(np.float32))
  xv, yv = _all(ds.val(4))
  np.testing.assert_array_equal(yv, np.repeat([0, 1, 2], 2))
  np.testing.assert_array_equal(xv[0], written[("val", "cat", 0)])
  # Per-channel statistics over the training images (golden: NumPy).
  train = np.stack([written[("train", c, i)] for c in CLASSES for i in range(8)]).reshape(-1, 3)
  np.testing.assert_allclose(info.mean, train.mean(0), rtol=1e-9)
  np.testing.assert_allclose(info.std, train.std(0), rtol=1e-6)


def test_image_folder_training_order_is_a_function_of_seed_and_epoch(tmp_path):
  write_folder(str(tmp_path / "pets"), counts=(("train", 8), ("test", 1)))
  ds = data.Dataset(None, image_folder=str(tmp_path / "pets"))
  two, steps = ds.train(8, seed=3, augment="flip_crop", epochs=2)
  assert steps == 3
  first = [x.numpy() for x, _ in two]
  resumed, _ = data.Dataset(None, image_folder=str(tmp_path / "pets")).train(
    8, seed=3, augment="flip_crop", first_epoch=1, epochs=2
  )
  for a, b in zip(first[3:], [x.numpy() for x, _ in resumed]):
    np.testing.assert_array_equal(a, b)  # epoch 2 resumed == epoch 2 uninterrupted
  other, _ = ds.train(8, seed=4, augment="flip_crop", epochs=1)
  assert not np.array_equal(first[0], next(iter(other))[0].numpy())
  labels = np.concatenate([y.numpy() for _, y in ds.train(8, seed=3, augment="none")[0]])
  assert sorted(labels.tolist()) == sorted(np.repeat([0, 1, 2], 8).tolist())  # every image, once
  # The fixed file order mixes the classes: a held-out tail and a head are not one class.
  held = data.Dataset(None, image_folder=str(tmp_path / "pets"), val_examples=6, train_examples=6)
  assert len(set(_all(held.val(6))[1].tolist())) > 1
  # The held-out files are the last ones training reads (read alone, not after a skip).
  tail = _all(held._train_src.skip(data._count(held._train_src) - 6).batch(64))
  np.testing.assert_array_equal(_all(held.val(6))[0], tail[0])
  np.testing.assert_array_equal(_all(held.val(6))[1], tail[1])
  assert (
    held.info.num_train == 6 and len(set(_all(held._train_src.take(6).batch(6))[1].tolist())) > 1
  )


def test_image_folder_varying_sizes_grey_and_jpeg(tmp_path):
  root = str(tmp_path / "mixed")
  write_folder(root, counts=(("train", 4), ("test", 2)), size=(10, 12), mode="L")
  write_folder(
    os.path.join(str(tmp_path), "big"), counts=(("train", 1),), size=(20, 24), mode="L", ext=".jpg"
  )
  os.replace(
    os.path.join(str(tmp_path), "big", "train", "cat", "000.jpg"),
    os.path.join(root, "train", "cat", "zzz.jpg"),
  )
  with pytest.raises(errors.DataError, match=r"2 sizes .*--image_size=H,W"):
    data.Dataset(None, image_folder=root)
  ds = data.Dataset(None, image_folder=root, image_size=(8, 8))
  assert ds.info.image_shape == (8, 8, 1) and ds.info.num_train == 13
  x, _ = _all(ds.test(8))
  assert x.shape == (6, 8, 8, 1) and x.min() >= 0 and x.max() <= 255
  np.testing.assert_array_equal(x, np.round(x))  # resized, then rounded back to pixels


@pytest.mark.parametrize(
  "layout,message",
  [
    ("none", "does not exist"),
    ("no_test", "no images in test/<class>/"),
    ("extra_class", "classes ['fox'] that train/ does not"),
    ("broken", "not a readable image"),
    ("empty_class", "train/ has class folders without images (fox;"),
    ("tiff", "bad.png: a TIFF image under an image name: convert it to PNG or JPEG"),
    ("empty_val", "val/ has no images in val/<class>/: add them, or remove val/"),
  ],
)
def test_image_folder_errors_are_one_line(tmp_path, layout, message):
  root = str(tmp_path / "d")
  if layout != "none":
    write_folder(root, counts=(("train", 2),) + ((("test", 1),) if layout != "no_test" else ()))
  if layout == "extra_class":
    os.makedirs(os.path.join(root, "test", "fox"))
    Image.new("RGB", (12, 10)).save(os.path.join(root, "test", "fox", "a.png"))
  if layout == "broken":
    open(os.path.join(root, "train", "cat", "bad.png"), "w").write("not a png")
  if layout == "empty_class":  # once a silent fourth class that no training image has
    os.makedirs(os.path.join(root, "train", "fox"))
    open(os.path.join(root, "train", "fox", "notes.txt"), "w").write("not an image")
    open(os.path.join(root, "train", "fox", "._a.png"), "w").write(
      "macOS metadata: hidden, skipped"
    )
  if layout == "empty_val":
    os.makedirs(os.path.join(root, "val", "cat"))
  if layout == "tiff":  # Pillow reads it; tf.io.decode_image stopped the run with a traceback
    Image.new("RGB", (12, 10)).save(os.path.join(root, "train", "cat", "bad.png"), "TIFF")
  with pytest.raises(errors.DataError) as e:
    data.Dataset(None, image_folder=root)
  assert message in str(e.value) and "\n" not in str(e.value)


@_HAS_TFDS
def test_tfds_split_slices_and_named_validation():
  ds = data.Dataset(
    "fashion_mnist",
    SHARED_TFDS,
    train_split="train[:200]",
    val_split="train[200:250]",
    test_split="test[:100]",
  )
  assert (ds.info.num_train, ds.info.num_val, ds.info.num_test) == (200, 50, 100)
  assert ds.info.class_names[0] == "T-shirt/top"
  x, _ = _all(ds.val(64))
  full = data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_split="train[:250]", val_examples=50, test_split="test[:10]"
  )
  np.testing.assert_array_equal(x, _all(full.val(64))[0])  # the slice is the held-out tail
  with pytest.raises(errors.UsageError, match="both given"):
    data.Dataset(
      "fashion_mnist", SHARED_TFDS, train_split="train[:10]", val_split="test[:5]", val_examples=2
    )


@_HAS_TFDS
@pytest.mark.parametrize(
  "spec, n",
  [("train[-200:]", 60), ("train[1000:1300]", 64), ("train[:300]+test[:50]", 80)],
)
def test_held_out_examples_are_the_last_the_training_split_reads(spec, n):
  """--val_examples=n holds out the last n examples the training split reads, in its order,
  whether read alone (one file: a tfds slice of just them) or after a skip (a union)."""
  ds = data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_split=spec, val_examples=n, test_split="test[5000:]"
  )
  source = data._tfds_source("fashion_mnist", SHARED_TFDS, spec, None, "test", (), None, None, None)
  total = data._count(source["train"])
  want = _all(source["train"].skip(total - n).batch(4096))
  got = _all(ds.val(32))
  assert ds.info.num_val == n and ds.info.num_train == total - n
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


@_HAS_TFDS
def test_held_out_examples_of_one_file_are_read_alone():
  """What data._last asks tfds to read: only the n examples of a one-file split (a skip over
  the split parses every example before them, ~4 s per pass over fashion_mnist's
  60,000); the whole spec, then a skip, when the split reads several files (tfds interleaves
  them)."""
  builder = data._builder("fashion_mnist", SHARED_TFDS)
  asked = []

  def read(split):
    asked.append(split)
    return tf.data.Dataset.range(1000)

  data._last(builder, "train[:90%]", 64, read)
  (one,) = asked
  (part,) = one.to_absolute(builder.info.splits)
  assert (part.splitname, part.from_, part.to) == ("train", 53936, 54000)
  asked.clear()
  tail = data._last(builder, "train[:10]+test[:5]", 3, read)
  assert asked == ["train[:10]+test[:5]"]
  assert list(tail.as_numpy_iterator()) == [997, 998, 999]
  asked.clear()
  from ban_tf import bench  # pylint: disable=g-import-not-at-top  # its tfds mock, as bench runs it

  with bench.tfds_mock(10):  # tfds.testing.mock_data: no split metadata, so the skip
    mocked = data._builder("fashion_mnist", None)
    assert list(data._last(mocked, "train", 2, read).as_numpy_iterator()) == [998, 999]
  assert asked == ["train"]


@_HAS_TFDS
def test_tfds_splits_that_share_training_examples_are_refused():
  """Validation or test examples that training reads: once silently scored as held-out data."""
  for kw, message in (
    (
      dict(train_split="train", val_split="train[90%:]"),
      "--train_split=train and --val_split=train[90%:] share 6000 examples, so val would score training data: "
      "use disjoint slices",
    ),
    (
      dict(train_split="train[:300]", test_split="train[200:400]"),
      "--train_split=train[:300] and --test_split=train[200:400] share 100 examples, so test would score",
    ),
    (
      dict(train_split="train[:300]", train_examples=250, val_split="train[240:260]"),
      "--train_split=train[:300] (its first 250 examples) and --val_split=train[240:260] share 10 examples",
    ),
  ):
    with pytest.raises(errors.DataError) as e:
      data.Dataset("fashion_mnist", SHARED_TFDS, **dict(dict(test_split="test[:10]"), **kw))
    assert message in str(e.value) and "\n" not in str(e.value)
  # Only the examples trained on count: the first --train_examples, not the held-out tail.
  ds = data.Dataset(
    "fashion_mnist",
    SHARED_TFDS,
    train_split="train[:300]",
    train_examples=200,
    val_split="train[200:300]",
    test_split="test[:10]",
  )
  assert (ds.info.num_train, ds.info.num_val) == (200, 100)


@_HAS_TFDS
def test_tfds_resize_keys_and_split_errors():
  ds = data.Dataset(
    "fashion_mnist",
    SHARED_TFDS,
    train_split="train[:16]",
    test_split="test[:8]",
    image_size=(16, 20),
  )
  assert ds.info.image_shape == (16, 20, 1)
  assert next(iter(ds.test(8)))[0].shape == (8, 16, 20, 1)
  with pytest.raises(
    errors.DataError, match=r"--test_split='validation': not a split .*its splits: "
  ):
    data.Dataset("fashion_mnist", SHARED_TFDS, train_split="train[:16]", test_split="validation")
  with pytest.raises(
    errors.DataError,
    match=r"no 'picture' feature \(its features: image, label\): "
    r"pass --image_key",
  ):
    data.Dataset("fashion_mnist", SHARED_TFDS, image_key="picture")
  # Keys that exist but hold the wrong kind of feature.
  with pytest.raises(errors.DataError, match="'image' is not a class label"):
    data.Dataset("fashion_mnist", SHARED_TFDS, label_key="image")


@pytest.mark.skipif(
  not os.path.isdir(os.path.join(SHARED_TFDS, "tiny_shakespeare")),
  reason="needs the prepared tiny_shakespeare in shared/",
)
def test_tfds_set_without_image_features_names_them():
  with pytest.raises(errors.DataError) as e:
    data.Dataset("tiny_shakespeare", SHARED_TFDS)
  assert str(e.value) == (
    "dataset 'tiny_shakespeare' has no 'image' feature (its features: text): "
    "pass --image_key=<its image feature>"
  )


@pytest.mark.slow
def test_image_folder_end_to_end_through_main_and_evaluate(tmp_path, monkeypatch):
  """--image_folder through the binary's run(): trains, exports, re-evaluates from config.json,
  from another working directory too (a relative --image_folder is stored absolute)."""
  root = str(tmp_path / "pets")
  write_folder(root, counts=(("train", 8), ("val", 2), ("test", 3)))
  fv = flags.FlagValues()
  main.define_flags(fv)
  run_dir = str(tmp_path / "run")
  monkeypatch.chdir(tmp_path)
  fv(
    [
      "ban_tf.main",
      "--image_folder=pets",
      "--image_size=8,8",
      "--arch=tiny",
      "--gens=1",
      "--epochs=1",
      "--batch_size=8",
      f"--run_dir={run_dir}",
      "--verbose=0",
    ]
  )
  cfg = main.config_from_flags(fv)
  assert cfg.image_size == (8, 8) and cfg.default_run_dir().startswith(
    os.path.join("runs", "pets-")
  )
  results = main.run(cfg)
  assert [g["role"] for g in results["generations"]] == ["teacher", "BAN-1"]
  assert "val_accuracy" in results["generations"][0]
  labels = open(os.path.join(run_dir, "gen_1", "saved_model", "labels.txt")).read().split()
  assert labels == list(CLASSES)
  sig = tf.saved_model.load(os.path.join(run_dir, "gen_1", "saved_model")).signatures[
    "serving_default"
  ]
  assert sig.structured_input_signature[1]["pixels"].shape.as_list() == [None, 8, 8, 3]
  assert json.load(open(os.path.join(run_dir, "config.json")))["image_folder"] == root
  assert (
    cfg.experiment_diff(
      dict(json.load(open(os.path.join(run_dir, "config.json"))), image_folder="pets")
    )
    == []
  )
  monkeypatch.chdir("/")  # once: "--image_folder=pets does not exist"
  again = evaluate.evaluate_run(run_dir, "val")
  stored = json.load(open(os.path.join(run_dir, "results.json")))
  assert stored["dataset"] == "pets"  # the folder's name, as results.md says (once: "cifar10")
  for got, want in zip(again["generations"], stored["generations"]):
    assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=1e-6)
  os.rename(os.path.join(root, "val"), os.path.join(str(tmp_path), "val_moved"))
  with pytest.raises(errors.UsageError, match="without a validation split"):
    evaluate.evaluate_run(run_dir, "val")


def test_bad_data_flags_are_one_line_usage_errors():
  fv = flags.FlagValues()
  main.define_flags(fv)
  for argv, message in (
    (["--image_size=8"], "two positive integers"),
    (["--image_size=a,b"], "two integers"),
    (["--val_split=validation", "--val_examples=5"], "drop one"),
    (["--image_folder=x", "--val_split=v"], "--image_folder reads DIR/train"),
    (
      ["--image_folder=x", "--dataset=mnist"],
      "--image_folder=.*x and --dataset=mnist both name the data: drop one",
    ),  # once silently ignored, config.json saying mnist
    (["--task=lm", "--image_size=8,8"], "image-only"),
  ):
    fv.unparse_flags()
    fv(["ban_tf.main", *argv])
    with pytest.raises(errors.UsageError, match=message):
      main.config_from_flags(fv).validate()


def test_run_dirs_from_before_the_data_flags_still_resume():
  """A config.json without the data-source fields reads as their defaults."""
  from ban_tf import config as config_lib  # pylint: disable=g-import-not-at-top

  cfg = config_lib.Config()
  old = {
    k: v
    for k, v in cfg.to_dict().items()
    if k
    not in (
      "image_folder",
      "train_split",
      "val_split",
      "test_split",
      "image_size",
      "image_key",
      "label_key",
    )
  }
  assert cfg.experiment_diff(old) == []
  assert config_lib.Config(val_split="validation").experiment_diff(old) == ["val_split"]


def test_user_built_tfds_set_with_other_feature_names(tmp_path):
  """A tfds builder without supervised keys, image under 'picture', label under 'category'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ByoPictures(tfds.core.GeneratorBasedBuilder):  # registered as "byo_pictures"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "picture": tfds.features.Image(shape=(None, None, 3)),
            "category": tfds.features.ClassLabel(names=["a", "b"]),
            "id": tfds.features.Text(),
          }
        )
      )

    def _split_generators(self, dl_manager):
      return {
        "train": self._generate_examples(12, 0),
        "validation": self._generate_examples(4, 1),
        "test": self._generate_examples(6, 2),
      }

    def _generate_examples(self, n, seed):
      rng = np.random.RandomState(seed)
      for i in range(n):
        size = (6 + i % 3, 7)  # varying sizes
        yield (
          f"{seed}-{i}",
          {
            "picture": rng.randint(0, 256, size + (3,)).astype(np.uint8),
            "category": i % 2,
            "id": str(i),
          },
        )

  ByoPictures(data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(
    errors.DataError, match=r"no 'image' feature \(its features: category, id, picture\)"
  ):
    data.Dataset("byo_pictures", str(tmp_path))
  with pytest.raises(errors.DataError, match=r"varying size .*--image_size=H,W"):
    data.Dataset("byo_pictures", str(tmp_path), image_key="picture", label_key="category")
  ds = data.Dataset(
    "byo_pictures",
    str(tmp_path),
    image_key="picture",
    label_key="category",
    val_split="validation",
    image_size=(6, 6),
  )
  info = ds.info
  assert (info.num_train, info.num_val, info.num_test, info.image_shape, info.class_names) == (
    12,
    4,
    6,
    (6, 6, 3),
    ("a", "b"),
  )
  x, y = _all(ds.test(4))
  assert x.shape == (6, 6, 6, 3) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
