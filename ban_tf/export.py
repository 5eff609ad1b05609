"""Atomic on-disk outputs: SavedModels, .keras files, JSON; loading teachers.

Everything is first written to a temporary sibling path and then renamed into
place, so a killed process never leaves a file or directory that looks complete
and is not. A generation's SavedModel carries a fingerprint (its logits on a fixed
pseudo-random batch) that is re-checked before it teaches the next generation.
"""

import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from ban_tf import errors

SERVE = "serve"
FINGERPRINT_FILE = "fingerprint.npz"


def _tmp_path(path):
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".tmp-{os.getpid()}-{tail}")


def _replace_dir(tmp, path):
  """Renames directory `tmp` to `path`, replacing an existing one."""
  old = None
  if os.path.exists(path):
    old = _tmp_path(path) + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
  os.replace(tmp, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def write_json(obj, path):
  tmp = _tmp_path(path)
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text(text, path):
  tmp = _tmp_path(path)
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def touch_done(directory):
  """Writes the DONE marker, the last file of a finished generation."""
  write_text("done\n", os.path.join(directory, "DONE"))


def is_done(directory):
  return os.path.exists(os.path.join(directory, "DONE"))


def fingerprint_inputs(input_shape, n=4):
  """A fixed pseudo-random batch of raw pixels in [0, 255]."""
  rng = np.random.RandomState(20180512)
  return rng.uniform(0, 255, size=(n,) + tuple(input_shape)).astype(np.float32)


def export_saved_model(model, path, input_shape=None):
  """model.export(...) to a temporary directory, fingerprint, rename into place.

  The SavedModel's `serve` endpoint maps float32 raw pixels [N, H, W, C] to the
  model's output. Returns the fingerprint outputs.
  """
  tmp = _tmp_path(path)
  shutil.rmtree(tmp, ignore_errors=True)
  model.export(tmp, format="tf_saved_model", verbose=False)
  shape = input_shape or tuple(model.inputs[0].shape[1:])
  x = fingerprint_inputs(shape)
  y = _call_saved_model(tmp, x)
  np.savez(os.path.join(tmp, FINGERPRINT_FILE), inputs=x, outputs=y)
  _replace_dir(tmp, path)
  return y


def save_keras(model, path):
  tmp = _tmp_path(path)
  if not tmp.endswith(".keras"):
    tmp += ".keras"
  model.save(tmp)
  os.replace(tmp, path)


def _call_saved_model(path, x):
  loaded = tf.saved_model.load(path)
  return getattr(loaded, SERVE)(tf.constant(x)).numpy()


def verify_saved_model(path, rtol=1e-4, atol=1e-4):
  """Re-checks a SavedModel against its stored fingerprint.

  Raises errors.TeacherError (one line, naming the fix) when the directory is
  missing, unreadable, or its outputs differ from the fingerprint.
  """
  fix = "delete its generation directory (its DONE marker) to retrain it, or use --overwrite"
  if not os.path.exists(os.path.join(path, "saved_model.pb")):
    raise errors.TeacherError(f"teacher SavedModel {path} is missing or incomplete: {fix}")
  fp = os.path.join(path, FINGERPRINT_FILE)
  try:
    data = np.load(fp)
    got = _call_saved_model(path, data["inputs"])
  except Exception as e:  # pylint: disable=broad-except
    raise errors.TeacherError(
        f"teacher SavedModel {path} cannot be loaded ({type(e).__name__}): {fix}") from None
  if got.shape != data["outputs"].shape or not np.allclose(got, data["outputs"], rtol=rtol, atol=atol):
    raise errors.TeacherError(f"teacher SavedModel {path} does not reproduce its fingerprint: {fix}")
  return got


def load_teacher(path, strategy=None, expected_classes=None):
  """The teacher for the next generation: the SavedModel as a frozen TFSMLayer.

  Call this outside any strategy scope: the fingerprint check runs the SavedModel
  eagerly, which fails inside a MirroredStrategy scope (lessons-from-peers.md,
  4.3). The layer itself is created inside `strategy.scope()` so its variables
  are mirrored, and must then only be called from fit/evaluate/predict.
  """
  if tf.distribute.has_strategy():
    raise RuntimeError("load_teacher must be called outside strategy.scope(); pass the strategy instead")
  out = verify_saved_model(path)
  if expected_classes is not None and out.shape[-1] != expected_classes:
    raise errors.TeacherError(
        f"teacher {path} outputs {out.shape[-1]} classes but the student has {expected_classes}: "
        "use a teacher trained on the same data set")
  with (strategy or tf.distribute.get_strategy()).scope():
    # float32 whatever the global policy: the `serve` signature takes float32 pixels,
    # and a mixed policy would otherwise autocast the input to bf16/fp16 and fail.
    layer = keras.layers.TFSMLayer(path, call_endpoint=SERVE, trainable=False, name="teacher",
                                   dtype="float32")
  layer.source_path = os.path.abspath(path)
  return layer
