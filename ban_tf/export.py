"""Atomic on-disk outputs: SavedModels, .keras files, JSON; SavedModel checks (teacher.py loads teachers).

Everything is first written to a temporary sibling path and then renamed into
place, so a killed process never leaves a file or directory that looks complete
and is not. A generation's SavedModel carries a fingerprint (its logits on a fixed
pseudo-random batch) that is re-checked before it teaches the next generation.
"""

import contextlib
import json
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from ban_tf import errors
from ban_tf import faults
from ban_tf import layout
from ban_tf import models

SERVE = "serve"  # raw pixels -> logits tensor (every SavedModel; what ban_tf reads)
INPUT_PIXELS = "pixels"  # the serving input of every image SavedModel, ensembles included
INPUT_TOKENS = "tokens"  # ... and of every language model's
LOGITS = "logits"  # serving_default's output key of a generation
PROBABILITIES = "probabilities"  # ... and of a BANE ensemble (mean softmax)
FEATURES = (
  "features"  # raw pixels -> pooled penultimate activations (models with a "features" layer)
)
STATEFUL = "serve_stateful"  # (tokens [N, T], state [N, S]) -> {"logits", "state"}: language models
BOTH = (
  "logits_and_features"  # raw pixels -> {"logits", "features"}: the activation-matching teacher
)
FINGERPRINT_FILE = "fingerprint.npz"
LABELS_FILE = "labels.txt"  # class names, one a line, in output order


def _tmp_path(path):
  head, tail = os.path.split(os.path.abspath(path))
  return os.path.join(head, f".tmp-{os.getpid()}-{tail}")


def remove_stale_tmp(root):
  """Deletes temporary outputs (`.tmp-*`) that a killed process left under `root`.

  Call only while holding the run directory's lock: no live writer exists then.
  """
  removed = []
  for parent, dirs, files in os.walk(root):
    for name in [d for d in dirs if d.startswith(".tmp-")]:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
      dirs.remove(name)
      removed.append(os.path.join(parent, name))
    for name in files:
      if name.startswith(".tmp-"):
        os.remove(os.path.join(parent, name))
        removed.append(os.path.join(parent, name))
  return removed


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
  """`obj` as indented JSON into `path`, atomically (write_text)."""
  write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_text(text, path):
  """`text` into `path` atomically: a fsynced temporary sibling renamed into place.

  Raises OSError when it cannot be written (no permission, `path` is a directory, a
  full disk), leaving `path` as it was and no temporary file behind.
  """
  _write_atomic(text, path, "w")


def write_bytes(data, path):
  """`data` (bytes) into `path` atomically, as write_text does."""
  _write_atomic(data, path, "wb")


def _write_atomic(content, path, mode):
  tmp = _tmp_path(path)
  try:
    with open(tmp, mode) as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_json_checked(path, fix, expect=dict):
  """The JSON in `path`, which must be an `expect` (dict or list).

  Raises:
    errors.RunDirError: one line naming the damaged file (missing, unreadable,
      invalid JSON, or another type) and then `fix`.
  """
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise errors.RunDirError(f"{path} is missing: {fix}") from None
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    why = type(e).__name__ + (
      f" at line {e.lineno} column {e.colno}" if hasattr(e, "lineno") else ""
    )
    raise errors.RunDirError(f"{path} is damaged ({why}): {fix}") from None
  if not isinstance(value, expect):
    raise errors.RunDirError(
      f"{path} is damaged (a JSON {type(value).__name__}, not "
      f"{'an object' if expect is dict else 'a list'}): {fix}"
    )
  return value


def touch_done(directory):
  """Writes the DONE marker, the last file of a finished generation."""
  write_text("done\n", os.path.join(directory, layout.DONE))


def is_done(directory):
  return os.path.exists(os.path.join(directory, layout.DONE))


def fingerprint_inputs(input_shape, n=4, num_tokens=None):
  """A fixed pseudo-random batch: raw pixels in [0, 255], or int32 token ids < num_tokens."""
  rng = np.random.RandomState(20180512)
  if num_tokens:
    return rng.randint(0, num_tokens, size=(n,) + tuple(input_shape)).astype(np.int32)
  return rng.uniform(0, 255, size=(n,) + tuple(input_shape)).astype(np.float32)


def _has_features(model):
  return any(layer.name == "features" for layer in model.layers)


def _input_spec(model, input_shape, spec=None):
  """The serving input, as the task's DataSpec describes it: `pixels` float32
  [N, H, W, C] with H, W, C fixed to the data set's image size, or, for a language
  model, `tokens` int32 [N, T] (any T). Without a spec: raw pixels of `input_shape`."""
  if spec is not None:
    return tf.TensorSpec(
      (None,) + tuple(spec.serving_shape), spec.input_dtype, name=spec.input_name
    )
  shape = tuple(input_shape or model.inputs[0].shape[1:])
  return tf.TensorSpec((None,) + shape, tf.float32, name=INPUT_PIXELS)


def _write_archive(model, path, input_shape=None, output_name=LOGITS, spec=None, stateful=None):
  """SavedModel with `serving_default` (input `pixels` or `tokens`, output {output_name}),
  `serve` (the same, returning the bare tensor, as ban_tf has always read it) and, when
  the model has a "features" layer, `features` and `logits_and_features` endpoints.

  The model is traced once, into one tf.function (`core`) that every endpoint calls;
  endpoints that each called the model traced it once each (an export took longer and the
  SavedModel was larger; figures in docs/performance.md).
  """
  signature = [_input_spec(model, input_shape, spec)]
  archive = keras.export.ExportArchive()
  archive.track(model)
  has_features = _has_features(model)
  if has_features:
    both = keras.Model(
      model.inputs, {"logits": model.outputs[0], "features": model.get_layer("features").output}
    )
    core = tf.function(
      lambda x: both(x, training=False), input_signature=signature, autograph=False
    )
    logits = lambda x: core(x)["logits"]
  else:
    core = tf.function(
      lambda x: model(x, training=False), input_signature=signature, autograph=False
    )
    logits = core
  # Registered first and under this name: what TF Serving, TFLite and saved_model_cli use.
  archive.add_endpoint(
    "serving_default",
    lambda x: {output_name: tf.cast(logits(x), tf.float32)},
    input_signature=signature,
  )
  archive.add_endpoint(SERVE, logits, input_signature=signature)
  if has_features:
    archive.add_endpoint(
      FEATURES, lambda x: tf.cast(core(x)["features"], tf.float32), input_signature=signature
    )
    archive.add_endpoint(
      BOTH,
      lambda x: {k: tf.cast(v, tf.float32) for k, v in core(x).items()},
      input_signature=signature,
    )
  if stateful is not None:  # shares the model's weights (lm_models.stateful)
    archive.track(stateful)
    state_spec = tf.TensorSpec((None, stateful.inputs[1].shape[-1]), tf.float32, name="state")
    archive.add_endpoint(
      STATEFUL,
      lambda x, s: dict(
        zip(
          (output_name, "state"), (tf.cast(t, tf.float32) for t in stateful([x, s], training=False))
        )
      ),
      input_signature=signature + [state_spec],
    )
  archive.write_out(path, verbose=False)


def export_saved_model(
  model,
  path,
  input_shape=None,
  class_names=(),
  output_name=LOGITS,
  *,
  spec=None,
  stateful=None,
  return_loaded=False,
):
  """Exports to a temporary directory, fingerprints, renames into place.

  Signatures (every endpoint takes the same input): `serving_default` maps float32
  raw pixels `pixels` [N, H, W, C], H, W and C fixed to `input_shape` (or, for a
  language model, int32 token ids `tokens` [N, T]) to {output_name: float32 [N, K]}
  (`logits`; `probabilities` for ensembles). `serve` returns the same tensor bare.
  Image models with a "features" layer also serve `features` (pooled penultimate
  activations, float32) and `logits_and_features` (a dict of both). `class_names`,
  when given, go to labels.txt beside it, so the model can be used
  (ban_tf.evaluate --images) without the data set. `spec` (a tasks.DataSpec) says
  what the model takes (the serving input, and the fingerprint batch); without it,
  float32 raw pixels of `input_shape`. `stateful`: a keras.Model sharing `model`'s
  weights, [tokens [N, T], state float32 [N, S]] -> [outputs, state [N, S]]
  (lm_models.stateful), served as `serve_stateful` ({output_name, "state"}), so a
  caller can carry the state across consecutive windows. Returns the fingerprint
  outputs of `serve`; with `return_loaded`, (those, the tf.saved_model.load object they
  were computed with), so a caller that reads the SavedModel next need not load it again
  (the files it was loaded from are the ones renamed into `path`).
  """
  tmp = _tmp_path(path)
  shutil.rmtree(tmp, ignore_errors=True)
  _write_archive(model, tmp, input_shape, output_name, spec, stateful)
  if spec is not None:
    x = spec.example_inputs()
  else:
    x = fingerprint_inputs(input_shape or tuple(model.inputs[0].shape[1:]))
  loaded = tf.saved_model.load(tmp)
  y = _call_saved_model(tmp, x, loaded)
  np.savez(os.path.join(tmp, FINGERPRINT_FILE), inputs=x, outputs=y)
  if class_names:
    with open(os.path.join(tmp, LABELS_FILE), "w") as f:
      f.write("".join(f"{name}\n" for name in class_names))
  faults.kill_if("kill_during_export", os.path.basename(os.path.dirname(os.path.abspath(path))))
  _replace_dir(tmp, path)
  return (y, loaded) if return_loaded else y


def save_keras(model, path):
  """Saves `model` as a .keras file (atomically). Pass the task's stock copy
  (Task.stock_model) so plain Keras loads it without ban_tf; fused BatchNormalization
  layers are replaced here in any case (models.to_stock)."""
  tmp = _tmp_path(path)
  if not tmp.endswith(".keras"):
    tmp += ".keras"
  if models.has_fused_layers(model):
    model = models.to_stock(model)
  model.save(tmp)
  os.replace(tmp, path)


def _call_saved_model(path, x, loaded=None):
  loaded = loaded if loaded is not None else tf.saved_model.load(path)
  return getattr(loaded, SERVE)(tf.constant(x)).numpy()


def verify_saved_model(path, rtol=1e-4, atol=1e-4, loaded=None):
  """Re-checks a SavedModel against its stored fingerprint.

  `loaded`: the tf.saved_model.load object of `path` when the caller already holds
  one (teacher.Teacher.load: the teacher's own), so the check runs on what is used.
  Raises errors.TeacherError (one line, naming the fix) when the directory is
  missing, unreadable, or its outputs differ from the fingerprint.
  """
  fix = "delete its generation directory (its DONE marker) to retrain it, or use --overwrite"
  if not os.path.exists(os.path.join(path, layout.SAVED_MODEL_PB)):
    raise errors.TeacherError(f"teacher SavedModel {path} is missing or incomplete: {fix}")
  fp = os.path.join(path, FINGERPRINT_FILE)
  if not os.path.exists(fp):
    raise errors.TeacherError(
      f"teacher SavedModel {path} has no {FINGERPRINT_FILE}: one not exported by ban_tf is read with "
      f"keras.layers.TFSMLayer(path, call_endpoint='serving_default') or --teacher=PATH; a ban_tf one is "
      f"damaged: {fix}"
    )
  try:
    data = np.load(fp)
    got = _call_saved_model(path, data["inputs"], loaded)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.TeacherError(
      f"teacher SavedModel {path} cannot be loaded ({type(e).__name__}): {fix}"
    ) from None
  if got.shape != data["outputs"].shape or not np.allclose(
    got, data["outputs"], rtol=rtol, atol=atol
  ):
    raise errors.TeacherError(
      f"teacher SavedModel {path} does not reproduce its fingerprint: {fix}"
    )
  return got


def teacher_feature_dim(path, loaded=None):
  """Width of the SavedModel's `features` output; TeacherError if it has none."""
  loaded = loaded if loaded is not None else tf.saved_model.load(path)
  if not hasattr(loaded, BOTH):
    raise errors.TeacherError(
      f"teacher SavedModel {path} has no '{BOTH}' endpoint (exported without a features layer or "
      "by an older ban_tf): retrain that generation, or use --feature_weight=0"
    )
  x = np.load(os.path.join(path, FINGERPRINT_FILE))["inputs"][:1]
  return int(getattr(loaded, BOTH)(tf.constant(x))["features"].shape[-1])


_HEAVY_OPS = ("Conv2D", "DepthwiseConv2dNative", "MatMul", "BatchMatMulV2", "Einsum")


def compute_dtype_of(fn):
  """The dtype a restored SavedModel function's convolutions and matmuls run in.

  "float32", "bfloat16", "float16", or "unknown" when it has none. A model built
  under a mixed policy exports a graph that computes in the low precision (with
  float32 logits); a float32 model exports a float32 graph. `fn`: an endpoint of
  tf.saved_model.load(...) (e.g. the one a teacher.Teacher calls).
  """
  concrete = fn if hasattr(fn, "graph") else fn.get_concrete_function()
  graph_def = concrete.graph.as_graph_def()
  counts = {}
  nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
  for node in nodes:
    if node.op in _HEAVY_OPS and "T" in node.attr:
      name = tf.as_dtype(node.attr["T"].type).name
      counts[name] = counts.get(name, 0) + 1
  return max(counts, key=counts.get) if counts else "unknown"


def state_size(path, loaded=None):
  """S of the SavedModel's `serve_stateful` endpoint; TeacherError if it has none."""
  loaded = loaded if loaded is not None else tf.saved_model.load(path)
  if not hasattr(loaded, STATEFUL):
    raise errors.TeacherError(
      f"teacher SavedModel {path} has no '{STATEFUL}' endpoint (exported by an older ban_tf): retrain "
      "that generation, or use --lm_state=reset"
    )
  fn = getattr(loaded, STATEFUL)
  concrete = fn if hasattr(fn, "structured_input_signature") else fn.concrete_functions[0]
  return int(concrete.structured_input_signature[0][1].shape[-1])
