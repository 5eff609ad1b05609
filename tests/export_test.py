"""Export round trips, fingerprints, atomic writes and the BANE ensemble."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import errors
from ban_tf import export
from ban_tf import generations
from ban_tf import models

SHAPE = (12, 12, 3)


def tiny(seed, name):
  keras.utils.set_random_seed(seed)
  return models.build_model("tiny", 5, SHAPE, mean=(120.0, 110.0, 100.0), std=(60.0, 50.0, 40.0), name=name)


def test_export_reload_identical_logits(tmp_path):
  model = tiny(0, "m")
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, SHAPE)
  x = np.random.RandomState(5).uniform(0, 255, (7,) + SHAPE).astype(np.float32)
  want = model(x, training=False).numpy()
  loaded = tf.saved_model.load(path)
  np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), want, atol=1e-5)
  layer = export.load_teacher(path, expected_classes=5)
  np.testing.assert_allclose(layer(tf.constant(x)).numpy(), want, atol=1e-5)
  assert layer.source_path == os.path.abspath(path)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no temporary left behind


def test_keras_file_round_trip(tmp_path):
  model = tiny(1, "k")
  path = str(tmp_path / "model.keras")
  export.save_keras(model, path)
  x = np.random.RandomState(6).uniform(0, 255, (3,) + SHAPE).astype(np.float32)
  again = keras.saving.load_model(path)
  np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), atol=1e-6)


def test_fingerprint_detects_a_changed_model(tmp_path):
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(2, "a"), path, SHAPE)
  export.verify_saved_model(path)
  # Swap in another model's variables: the directory still loads but is not the same teacher.
  other = str(tmp_path / "other")
  export.export_saved_model(tiny(3, "a"), other, SHAPE)
  for name in os.listdir(os.path.join(other, "variables")):
    os.replace(os.path.join(other, "variables", name), os.path.join(path, "variables", name))
  with pytest.raises(errors.TeacherError, match="fingerprint"):
    export.verify_saved_model(path)


def test_missing_and_mismatched_teacher(tmp_path):
  with pytest.raises(errors.TeacherError, match="missing"):
    export.load_teacher(str(tmp_path / "nope"))
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(4, "b"), path, SHAPE)
  with pytest.raises(errors.TeacherError, match="5 classes but the student has 10"):
    export.load_teacher(path, expected_classes=10)


def test_export_replaces_atomically(tmp_path):
  path = str(tmp_path / "saved_model")
  export.export_saved_model(tiny(5, "c"), path, SHAPE)
  first = np.load(os.path.join(path, export.FINGERPRINT_FILE))["outputs"]
  export.export_saved_model(tiny(6, "c"), path, SHAPE)
  second = export.verify_saved_model(path)
  assert not np.allclose(first, second)
  assert sorted(os.listdir(tmp_path)) == ["saved_model"]


def test_write_json_is_atomic(tmp_path):
  path = str(tmp_path / "m.json")
  export.write_json({"a": 1}, path)
  export.write_json({"a": 2}, path)
  assert export.read_json(path) == {"a": 2}
  assert os.listdir(tmp_path) == ["m.json"]


def test_ensemble_is_mean_of_member_probabilities(tmp_path):
  members = [tiny(10 + i, f"g{i}") for i in range(3)]
  ens = generations.build_ensemble(members)
  x = np.random.RandomState(7).uniform(0, 255, (9,) + SHAPE).astype(np.float32)
  probs = [tf.nn.softmax(m(x, training=False)).numpy() for m in members]
  want = np.mean(probs, axis=0)
  got = ens(x).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  # Averaging probabilities is not averaging logits.
  assert not np.allclose(got, tf.nn.softmax(np.mean([m(x).numpy() for m in members], 0)).numpy(), atol=1e-4)
  path = str(tmp_path / "ens")
  export.export_saved_model(ens, path, SHAPE)
  loaded = tf.saved_model.load(path)
  np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), want, atol=1e-5)


def test_ensemble_members():
  assert generations.ensemble_members(3) == [1, 2, 3]
  assert generations.ensemble_members(2, include_teacher=True) == [0, 1, 2]
