"""Tests for keras:NAME backbones (archs.KERAS_APPLICATIONS, models.build_keras_application).

Small builds of the light backbones run by default; every backbone, and the parameter
counts at 224x224 / 1000 classes against keras.applications' own models, with
BAN_SLOW_TESTS=1 (a few minutes: the largest have hundreds of millions of weights).
"""

import os

import keras
import numpy as np
import pytest

from ban_tf import archs
from ban_tf import config
from ban_tf import distiller
from ban_tf import errors
from ban_tf import models

_SLOW = pytest.mark.skipif(
  not os.environ.get("BAN_SLOW_TESTS"), reason="slow; set BAN_SLOW_TESTS=1"
)
# Backbones small enough to build at every test run (< 6M weights, a few seconds each).
_LIGHT = (
  "MobileNetV3Small",
  "MobileNetV2",
  "EfficientNetB0",
  "EfficientNetV2B0",  # EfficientNetV2 once failed to build (its constructors key on name=)
  "ResNet50V2",
  "DenseNet121",
)


def _all_names(light_marks=()):
  return [
    pytest.param(n, marks=list(light_marks) if n in _LIGHT else [_SLOW])
    for n in archs.KERAS_APPLICATIONS
  ]


def _keras_names():
  return {
    n
    for n in dir(keras.applications)
    if n[0].isupper() and callable(getattr(keras.applications, n))
  }


def test_names_are_what_keras_applications_offers():
  assert set(archs.KERAS_APPLICATIONS) == _keras_names()
  assert set(archs.MOBILENET_V3_LAST_POINT) <= set(archs.KERAS_APPLICATIONS)


def _family_module(name):
  """The keras.applications.<family> module of an application (its preprocess_input)."""
  public = getattr(keras.applications, name).__module__.rsplit(".", 1)[-1]
  return getattr(keras.applications, public)


@pytest.mark.parametrize("name", sorted(archs.KERAS_APPLICATIONS))
def test_scaling_is_the_familys_preprocess_input(name):
  """Raw pixels through the model's "preprocess" layer give what
  keras.applications.<family>.preprocess_input gives; "builtin" families' own
  preprocess_input is the identity (the model rescales itself)."""
  scaling = archs.KERAS_APPLICATIONS[name][0]
  x = np.random.RandomState(0).uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
  want = np.asarray(_family_module(name).preprocess_input(x.copy()))
  layer = models._scaling_layer(scaling)  # pylint: disable=protected-access
  if scaling == "builtin":
    assert layer is None
    np.testing.assert_array_equal(want, x)
    return
  inputs = keras.Input((5, 7, 3))
  m = keras.Model(inputs, layer(inputs))
  if scaling == "caffe":
    perm = np.zeros((3, 3), np.float32)
    perm[[0, 1, 2], [2, 1, 0]] = 1.0
    layer.set_weights([perm, -np.asarray(archs.CAFFE_MEAN_BGR, np.float32)])
  np.testing.assert_allclose(m(x).numpy(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", _all_names())
def test_builds_small_with_the_contract(name):
  """Every backbone builds at its minimum size for 10 classes: float32 logits, a
  "features" layer of the width archs lists, trainable parameters = archs.param_count."""
  arch = archs.KERAS_PREFIX + name
  spec = archs.parse_arch(arch)
  size = spec["min_size"]
  model = models.build_model(arch, 10, (size, size, 3))
  assert model.output.shape[-1] == 10 and model.output.dtype == "float32"
  assert model.get_layer("features").output.shape[-1] == spec["features"]
  assert model.get_layer("logits").dtype_policy.name == "float32"
  assert models.count_params(model) == archs.param_count(arch, 10)
  backbone = model.get_layer(models.BACKBONE)
  assert backbone.output.shape[-1] == spec["pooled"]
  assert models.count_params(backbone) == spec["backbone_params"]
  x = np.random.RandomState(1).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  logits = model(x, training=False).numpy()
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", _all_names(light_marks=[_SLOW]))
def test_param_count_at_224_equals_keras_applications_own(name):
  """Our model for 1000 classes has exactly the trainable parameters of
  keras.applications.NAME(weights=None, classes=1000) at 224x224 (VGG: of its
  include_top=False backbone plus the Dense classifier, since ours pools instead of
  flattening into 4096-wide layers). Conv nets' counts do not depend on the size, so ours
  is built at the minimum size."""
  arch = archs.KERAS_PREFIX + name
  size = archs.parse_arch(arch)["min_size"]
  ours = models.count_params(models.build_model(arch, 1000, (size, size, 3)))
  keras.backend.clear_session()
  app = getattr(keras.applications, name)
  if name.startswith("VGG"):
    own = app(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    want = models.count_params(own) + 512 * 1000 + 1000
  else:
    own = app(weights=None, include_top=True, classes=1000, input_shape=(224, 224, 3))
    want = models.count_params(own)
  assert ours == want == archs.param_count(arch, 1000)


def test_bad_names_name_close_matches():
  with pytest.raises(ValueError, match=r"close matches: keras:ResNet50\b"):
    archs.parse_arch("keras:ResNet5")
  with pytest.raises(ValueError, match="keras:MobileNetV3Small"):
    archs.parse_arch("keras:mobilenetv3smal")
  with pytest.raises(ValueError, match="the names are ConvNeXtBase, "):
    archs.parse_arch("keras:zzzzzz")
  # A zoo name without the prefix points at it.
  with pytest.raises(ValueError, match=r"--arch=keras:ResNet50\)"):
    archs.parse_arch("resnet50")
  assert archs.parse_arch("keras:resnet50")["application"] == "ResNet50"  # any case


def test_bad_name_is_one_usage_error_line(monkeypatch, capsys):
  from tests.conftest import run_main  # pylint: disable=g-import-not-at-top

  code, out, err = run_main(monkeypatch, capsys, ["--arch=keras:EfficientNetB9", "--gens=1"])
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: --arch='keras:EfficientNetB9'"), err
  assert "close matches: keras:EfficientNetB7" in lines[0]


def test_minimum_sizes():
  assert archs.parse_arch("keras:InceptionV3")["min_size"] == 75
  assert archs.parse_arch("keras:Xception")["min_size"] == 71
  with pytest.raises(ValueError, match="at least 75x75 pixels, got 64x64: pass --image_size=75,75"):
    archs.check_image_size("keras:InceptionV3", (64, 64, 3))
  with pytest.raises(ValueError, match="at least 32x32"):
    models.build_model("keras:MobileNetV3Small", 10, (28, 28, 1))
  with pytest.raises(ValueError, match="RGB"):
    archs.check_image_size("keras:ResNet50", (32, 32, 4))
  archs.check_image_size("wrn-16-1", (8, 8, 4))  # the CIFAR zoo takes any size
  # Config validation (no TensorFlow) refuses an --image_size below the minimum.
  cfg = config.Config(arch="keras:Xception", image_size=(64, 64), gens=1)
  with pytest.raises(errors.UsageError, match="at least 71x71"):
    cfg.validate()
  config.Config(arch="keras:Xception", image_size=(71, 80), gens=1).validate()


def test_share_stem_head_refused_and_feature_widths_checked():
  with pytest.raises(errors.UsageError, match='no shared "stem"'):
    config.Config(arch="keras:ResNet50", share_stem_head=True, gens=1).validate()
  # Widths known without Keras: DenseNet121 (1024) -> ResNet50 (2048) needs a projection.
  cfg = config.Config(
    arch="keras:ResNet50", teacher_arch="keras:DenseNet121", feature_weight=1.0, gens=1
  )
  with pytest.raises(
    errors.UsageError, match="2048 features but the teacher keras:DenseNet121 has 1024"
  ):
    cfg.validate()
  config.Config(
    arch="keras:ResNet50",
    teacher_arch="keras:DenseNet121",
    feature_weight=1.0,
    feature_projection=True,
    gens=1,
  ).validate()
  assert "keras_ResNet50" in config.Config(arch="keras:ResNet50").default_run_dir()
  assert ":" not in config.Config(arch="keras:ResNet50").default_run_dir()


@pytest.mark.slow
def test_grey_images_are_replicated_to_rgb():
  keras.utils.set_random_seed(0)
  grey = models.build_model("keras:MobileNetV3Small", 3, (32, 32, 1))
  keras.utils.set_random_seed(0)
  rgb = models.build_model("keras:MobileNetV3Small", 3, (32, 32, 3))
  x = np.random.RandomState(2).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
  np.testing.assert_allclose(
    grey(x, training=False).numpy(), rgb(np.repeat(x, 3, -1), training=False).numpy(), rtol=1e-5
  )


@pytest.mark.slow
def test_batchnorm_fused_nested_and_stock_copy():
  """The backbone's BatchNormalization layers are fused (as in the CIFAR zoo), found by
  the Distiller's replica averaging and by --sync_batchnorm, and model.keras gets stock
  ones with equal outputs."""
  model = models.build_model("keras:MobileNetV3Small", 4, (32, 32, 3))
  backbone = model.get_layer(models.BACKBONE)
  bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert bns and all(isinstance(l, models.FusedBatchNormalization) for l in bns)
  assert models.has_fused_layers(model)
  assert len(distiller.moving_statistics(model)) == 2 * len(bns)
  x = np.random.RandomState(3).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
  model(x, training=True)  # moves the statistics off their initial values
  stock = models.to_stock(model)
  assert not models.has_fused_layers(stock)
  np.testing.assert_allclose(
    stock(x, training=False).numpy(), model(x, training=False).numpy(), rtol=1e-5, atol=1e-5
  )
  assert models.synchronize_batchnorm(model) == len(bns)
  assert all(l.synchronized for l in bns)


@pytest.mark.slow
def test_same_seed_same_weights():
  def build():
    keras.utils.set_random_seed(5)
    return models.build_model("keras:MobileNetV3Small", 4, (32, 32, 3)).get_weights()

  for a, b in zip(build(), build()):
    np.testing.assert_array_equal(a, b)


# ---- --init_weights -----------------------------------------------------------
@pytest.mark.slow
def test_init_weights_from_a_local_file_and_missing_files(tmp_path, monkeypatch):
  """A backbone's weights saved from keras.applications (include_top=False) start the
  model; the classifier stays fresh. Missing files are one-line usage errors."""
  keras.utils.set_random_seed(1)
  own = keras.applications.MobileNetV3Small(
    weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
  )
  rng = np.random.RandomState(4)
  own.set_weights([w + rng.uniform(-0.1, 0.1, w.shape).astype(w.dtype) for w in own.get_weights()])
  path = str(tmp_path / "backbone.weights.h5")
  own.save_weights(path)
  keras.utils.set_random_seed(2)
  model = models.build_model("keras:MobileNetV3Small", 5, (32, 32, 3), init_weights=path)
  got = model.get_layer(models.BACKBONE).get_weights()
  assert len(got) == len(own.get_weights())
  for a, b in zip(got, own.get_weights()):
    np.testing.assert_array_equal(a, b)
  keras.utils.set_random_seed(2)
  fresh = models.build_model("keras:MobileNetV3Small", 5, (32, 32, 3))
  assert not np.array_equal(
    fresh.get_layer(models.BACKBONE).get_weights()[0], got[0]
  )  # the file was used
  # A file of another backbone does not fit: one line naming the fix.
  with pytest.raises(
    ValueError,
    match=r"does not fit keras:MobileNetV2's backbone .*MobileNetV2\(include_top=False\)",
  ):
    models.build_model("keras:MobileNetV2", 5, (32, 32, 3), init_weights=path)
  # Validation (no TensorFlow): a missing file, or a non-keras arch.
  with pytest.raises(errors.UsageError, match="no such file"):
    config.Config(arch="keras:MobileNetV3Small", init_weights=str(tmp_path / "nope.h5")).validate()
  with pytest.raises(errors.UsageError, match="initialises keras:NAME backbones"):
    config.Config(arch="tiny", init_weights=path).validate()
  config.Config(arch="keras:MobileNetV3Small", init_weights=path).validate()
  # imagenet offline: where Keras looks for the file, and where to fetch it from.
  from keras.src.backend import config as keras_config  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "khome"))
  (tmp_path / "khome").mkdir()
  where, url = models.imagenet_weights_file("keras:ResNet50", (64, 64, 3))
  assert where == str(
    tmp_path / "khome" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
  )
  assert url.startswith("https://") and url.endswith(
    "/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
  )
  with pytest.raises(
    FileNotFoundError,
    match=r"not in .*khome/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5 .*curl -o",
  ):
    models.build_model("keras:ResNet50", 5, (64, 64, 3), init_weights="imagenet")


# ---- end to end (the binary) --------------------------------------------------
def _jpeg_folder(root, size=32, per_class=(("train", 12), ("test", 4)), classes=("a", "b", "c")):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  for split, n in per_class:
    for k, c in enumerate(classes):
      os.makedirs(os.path.join(root, split, c))
      for i in range(n):
        base = np.zeros((size, size, 3), np.float32)
        base[..., k] = 200.0  # each class its own dominant colour
        pixels = np.clip(base + rng.uniform(0, 55, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, c, f"{i:03d}.jpg"), quality=90)
  return root


_E2E = [
  "--arch=keras:MobileNet",  # the cheapest Keras graph to trace and export (~60% of MobileNetV3Small)
  "--epochs=2",
  "--batch_size=12",
  "--lr=0.01",
  "--deterministic",
  "--verbose=2",
]


def _json(run_dir, rel):
  import json  # pylint: disable=g-import-not-at-top

  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
      return [clean(v) for v in x]
    return x

  with open(os.path.join(run_dir, rel)) as f:
    return clean(json.loads(f.read().replace(os.path.abspath(run_dir), "<run>")))


@pytest.mark.slow
def test_ban_run_of_a_keras_backbone_on_jpegs_resumes_exactly_and_exports(
  tmp_path, monkeypatch, capsys, caplog
):
  """keras:MobileNet, teacher and BAN-1 on a folder of generated JPEGs: stopped mid-
  generation 1 and resumed equals the uninterrupted run; a rerun trains nothing; the
  SavedModel serves raw pixels and model.keras loads in plain Keras with equal outputs.

  The teacher is trained once (--gens=0) and copied: both runs extend it with --gens=1, as
  multireplica_test's run matrix does. Every run is main() in this process; the "kill" is a
  full disk where generation 1's epoch-2 checkpoint is saved (the epoch-1 checkpoint is kept),
  the restore path a SIGKILL takes too (a real SIGKILL: multireplica_test's image-2replica
  cell, tasks_contract_test, resume_test).
  """
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from tests.conftest import run_main  # pylint: disable=g-import-not-at-top

  folder = _jpeg_folder(str(tmp_path / "jpegs"))
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")

  def main(run_dir, gens=1):
    argv = [f"--image_folder={folder}", f"--run_dir={run_dir}"] + _E2E + [f"--gens={gens}"]
    code, out, err = run_main(monkeypatch, capsys, argv)
    assert code == 0, err[-3000:]
    return out + err

  main(full, gens=0)
  shutil.copytree(full, killed)
  assert "Epoch " in main(full)  # --verbose=2 prints Keras' epochs (the rerun's check below)
  monkeypatch.setenv("BAN_TF_FAULT", "enospc@gen_1/epoch_2")
  argv = [f"--image_folder={folder}", f"--run_dir={killed}"] + _E2E + ["--gens=1"]
  code, _, err = run_main(monkeypatch, capsys, argv)
  assert code == 2 and "no space left" in err, err[-3000:]
  monkeypatch.delenv("BAN_TF_FAULT")
  assert os.path.exists(os.path.join(killed, "gen_0", "DONE"))
  assert not os.path.exists(os.path.join(killed, "gen_1", "DONE"))
  with caplog.at_level(logging.INFO, logger="absl"):
    main(killed)
  assert "gen 1: resuming from epoch 1" in caplog.text, caplog.text[-3000:]
  for rel in ("results.json", "gen_0/metrics.json", "gen_1/history.json", "gen_1/metrics.json"):
    assert _json(killed, rel) == _json(full, rel), rel
  fp = [
    np.load(os.path.join(d, "gen_1", "saved_model", "fingerprint.npz"))["outputs"]
    for d in (full, killed)
  ]
  np.testing.assert_array_equal(fp[0], fp[1])
  assert "Epoch " not in main(full)  # rerun: everything done
  assert _json(full, "results.json") == _json(killed, "results.json")
  # Serving and plain Keras, in a process that cannot import ban_tf.
  from PIL import Image  # pylint: disable=g-import-not-at-top

  x = np.stack(
    [
      np.asarray(Image.open(os.path.join(folder, "test", c, "000.jpg")), np.float32)
      for c in ("a", "b", "c")
    ]
  )
  np.save(tmp_path / "x.npy", x)
  script = """
import importlib.abc, json, sys
class NoBanTf(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "ban_tf":
      raise ImportError("blocked")
sys.meta_path.insert(0, NoBanTf())
import keras, numpy as np, tensorflow as tf
gen, x = sys.argv[1], np.load(sys.argv[2])
model = keras.saving.load_model(gen + "/model.keras")
serving = tf.saved_model.load(gen + "/saved_model").signatures["serving_default"]
print(json.dumps({"keras": model.predict(x, verbose=0).tolist(),
                  "served": serving(pixels=tf.constant(x))["logits"].numpy().tolist()}))
"""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run(
    [sys.executable, "-c", script, os.path.join(full, "gen_1"), str(tmp_path / "x.npy")],
    cwd=str(tmp_path),
    env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert np.asarray(got["keras"]).shape == (3, 3)
  np.testing.assert_allclose(got["keras"], got["served"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cross_family_student_with_feature_matching(tmp_path, monkeypatch, capsys):
  """A keras:MobileNetV3Small teacher (the family that scales its own inputs; 1024 features
  after its last-point layer) teaches a keras:MobileNet student (1024) with activation matching
  through a learned projection, as the paper's DenseNet -> ResNet rows pair families: the
  teacher's SavedModel serves its features and the student's feature loss is computed from them
  (unequal widths: test_share_stem_head_refused_and_feature_widths_checked)."""
  from tests.conftest import run_main  # pylint: disable=g-import-not-at-top

  folder = _jpeg_folder(str(tmp_path / "jpegs"), per_class=(("train", 8), ("test", 2)))
  run_dir = str(tmp_path / "run")
  code, _, err = run_main(
    monkeypatch,
    capsys,
    [
      f"--image_folder={folder}",
      f"--run_dir={run_dir}",
      "--teacher_arch=keras:MobileNetV3Small",
      "--arch=keras:MobileNet",
      "--feature_weight=0.1",
      "--feature_projection",
      "--gens=1",
      "--epochs=1",
      "--batch_size=12",
      "--verbose=0",
    ],
  )
  assert code == 0, err[-3000:]
  generations = _json(run_dir, "results.json")["generations"]
  assert [g["arch"] for g in generations] == ["keras:MobileNetV3Small", "keras:MobileNet"]
  assert os.path.exists(os.path.join(run_dir, "gen_1", "DONE"))
  (epoch,) = _json(run_dir, "gen_1/history.json")
  assert epoch["feature_loss"] > 0 and np.isfinite(epoch["loss"]), epoch


# ---- recipes: warm-up and cosine decay ---------------------------------------
@pytest.mark.parametrize("kind", ["step", "cosine"])
def test_lr_schedules_with_warmup_are_functions_of_the_step(kind):
  """--lr_schedule with --warmup_epochs: linear 0 -> lr over the warm-up, then step
  decay at the milestones or Keras' cosine to 0; golden values from the closed forms."""
  import math  # pylint: disable=g-import-not-at-top

  from ban_tf import tasks  # pylint: disable=g-import-not-at-top

  cfg = config.Config(
    epochs=10, lr=0.4, warmup_epochs=2, lr_schedule=kind, lr_milestones=(0.5, 0.8), lr_decay=0.1
  )
  cfg.validate()
  steps = 7
  schedule = tasks.get("image").make_optimizer(cfg, steps).learning_rate
  if not callable(schedule):
    schedule = tasks.get("image").make_optimizer(cfg, steps)._learning_rate  # pylint: disable=protected-access
  total, warm = 10 * steps, 2 * steps

  def want(s):
    if s < warm:
      return 0.4 * s / warm
    if kind == "cosine":
      return 0.4 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
    return 0.4 * 0.1 ** sum(s >= b for b in (5 * steps, 8 * steps))

  for s in (0, 1, warm - 1, warm, warm + 3, 5 * steps - 1, 5 * steps, 8 * steps, total - 1, total):
    assert float(schedule(s)) == pytest.approx(want(s), rel=1e-5, abs=1e-7), s
  with pytest.raises(errors.UsageError, match="--warmup_epochs=10: must be in"):
    config.Config(epochs=10, warmup_epochs=10).validate()
  with pytest.raises(errors.UsageError, match="--lr_schedule='linear'"):
    config.Config(lr_schedule="linear").validate()
