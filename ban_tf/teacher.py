"""The one teacher feed: what a frozen teacher outputs, decided once when it is loaded.

A `Teacher` is called as `teacher(x)` or, carrying state, `teacher(x, state)` and returns
`Outputs(logits, features, state)`: float32, stop-gradiented, whatever the teacher is.
Which endpoint it calls, which output it reads and whether those are probabilities
(turned into log-probabilities) is fixed by the constructor that made it:

* `Teacher.load(path, ...)`: a ban_tf generation's SavedModel (fingerprint re-checked);
  `serve` (logits), `logits_and_features` (with_features) or `serve_stateful` (stateful);
* `Teacher.signature(src, ...)`: any SavedModel's `serving_default`, called by its input
  name, one output read by name (pretrained.py, --teacher=PATH);
* `Teacher.wrap(model, outputs)`: a keras.Model, a keras.layers.TFSMLayer or any callable
  (the Python API: `distiller.Distiller(student, model)`); a dict output is read by name
  (`logits`, else `probabilities` (a BANE ensemble), else its only entry), the name chosen
  from the model's output structure when it is known and otherwise at its first call.

Probabilities are used as log-probabilities: softmax(log p / T) is proportional to
p^(1/T), which is softmax(z / T) for any logits z with softmax(z) = p, so every
objective sees the teacher it would see through its logits.

`TeacherLayer(teacher)` is a Teacher as a Keras layer (float32 logits): what a
pretrained teacher is exported and measured through.
"""

import os
from typing import NamedTuple, Optional

import keras
import tensorflow as tf
from absl import logging

from ban_tf import errors
from ban_tf import export

PROBABILITY_FLOOR = 1e-30  # log(0) guard for probability teachers
OUTPUTS = ("logits", "probabilities")


class Outputs(NamedTuple):
  """What a Teacher hands the distillation step (float32, stop-gradiented).

  logits: [N, C] or [N, T, V] (log-probabilities for a probability teacher).
  features: [N, F] pooled penultimate activations, or None (with_features only).
  state: [N, S] the next carried state, or None (stateful only).
  """

  logits: tf.Tensor
  features: Optional[tf.Tensor] = None
  state: Optional[tf.Tensor] = None


def log_probabilities(p):
  """log(max(p, 1e-30)): probabilities as logits with the same softmax."""
  return keras.ops.log(keras.ops.maximum(p, PROBABILITY_FLOOR))


def check_outputs(outputs):
  """Raises ValueError unless `outputs` is "logits" or "probabilities"."""
  if outputs not in OUTPUTS:
    raise ValueError(f"Distiller: teacher_outputs={outputs!r}: use 'logits' or 'probabilities'")


def _float32_input(x):
  # As a float32 Keras layer does: floating inputs at float32, integer token ids unchanged.
  x = tf.convert_to_tensor(x)
  return tf.cast(x, tf.float32) if x.dtype.is_floating and x.dtype != tf.float32 else x


def _stop(t):
  return None if t is None else tf.stop_gradient(tf.cast(t, tf.float32))


def choose_output(keys, outputs="logits"):
  """(key to read, whether it holds probabilities) of a dict output with `keys`.

  `logits` if present, else `probabilities`, else the only entry (read as `outputs`).
  Raises ValueError for several entries without either name.
  """
  keys = [k for k in keys if k not in ("features", "state")] or list(keys)
  if "logits" in keys:
    return "logits", False
  if "probabilities" in keys:
    return "probabilities", True
  if len(keys) == 1:
    return keys[0], outputs == "probabilities"
  raise ValueError(
    f"teacher outputs {sorted(keys)}: return one tensor, or name the logits 'logits' "
    "(or the probabilities 'probabilities')"
  )


class Teacher:
  """A frozen teacher: `teacher(x, state=None)` -> Outputs (float32, stop-gradiented).

  Build one with `Teacher.load`, `Teacher.signature` or `Teacher.wrap`, not directly.

  Args:
    read: (x, state) -> (outputs, features or None, next state or None), the raw call
      of the chosen endpoint.
    probabilities: its outputs are probabilities: log-probabilities are returned.
    variables: the teacher's variables (never trained).
    source_path: the SavedModel it was loaded from (absolute), or None.
    feature_dim: F of `features` (with_features), else None.
    state_size: S of the carried state (stateful), else None.
    compute_dtype_found: what the SavedModel's graph computes in (export.compute_dtype_of).
    owner: the object the endpoint belongs to (kept alive with the Teacher).
  """

  def __init__(
    self,
    read,
    *,
    probabilities=False,
    variables=(),
    source_path=None,
    feature_dim=None,
    state_size=None,
    compute_dtype_found=None,
    owner=None,
  ):
    self._read = read
    self.probabilities = bool(probabilities)
    self._variables = list(variables)
    self.source_path = source_path
    self.feature_dim = feature_dim
    self.state_size = state_size
    self.compute_dtype_found = compute_dtype_found
    self._owner = owner

  @property
  def variables(self):
    return self._variables

  @property
  def trainable_variables(self):
    return []  # frozen

  def __call__(self, x, state=None):
    out, features, new_state = self._read(x, state)
    logits = tf.cast(out, tf.float32)
    if self.probabilities:
      logits = log_probabilities(logits)
    return Outputs(tf.stop_gradient(logits), _stop(features), _stop(new_state))

  def stateful_call(self, inputs, training=False):
    """([x, state], training) -> (logits, next state): the stateful teacher as a student
    of distiller.CarriedState (scoring a teacher over a stream)."""
    del training  # always inference
    out = self(inputs[0], inputs[1])
    return out.logits, out.state

  # ---- constructors -------------------------------------------------------------
  @classmethod
  def load(cls, path, strategy=None, expected_classes=None, with_features=False, stateful=False):
    """A ban_tf generation's SavedModel as the next generation's teacher.

    Endpoint: `serve` (logits), with `with_features` `logits_and_features` (logits and
    features, `feature_dim` = F), with `stateful` `serve_stateful` (call it as
    teacher(tokens, state); `state_size` = S). The SavedModel is read once, inside
    `strategy.scope()` (its variables mirrored), and that very copy is checked against
    its fingerprint, its class count and endpoint (one-line errors.TeacherError naming
    the fix).

    Precision: the teacher runs the graph it was exported with, inside the student's
    compiled (and, with --jit_compile, XLA-compiled) step. Every generation of a run
    shares --mixed_precision, so a teacher trained under a mixed policy already computes
    at the student's precision, and only its float32 logits leave it: the KD target is
    computed from them in float32. `compute_dtype_found` records what the graph computes
    in; a float32 teacher under a mixed policy is logged as a warning
    (tests/teacher_precision_test.py bounds the bf16 teacher's target against float32's).
    Call this outside any strategy scope (the checks run the SavedModel eagerly, which
    fails inside a MirroredStrategy scope); call the Teacher from fit/evaluate/predict.

    Raises:
      errors.TeacherError: missing, damaged, without the endpoint, or another class count.
      RuntimeError: called inside a strategy scope.
    """
    if tf.distribute.has_strategy():
      raise RuntimeError(
        "Teacher.load must be called outside strategy.scope(); pass the strategy instead"
      )
    endpoint = export.STATEFUL if stateful else export.BOTH if with_features else export.SERVE
    try:
      with (strategy or tf.distribute.get_strategy()).scope():
        loaded = tf.saved_model.load(path)
      fn = getattr(loaded, endpoint)
    except Exception:  # pylint: disable=broad-except
      # Missing, damaged, or without the endpoint: the checks below name which (one line).
      export.verify_saved_model(path)
      if with_features:
        export.teacher_feature_dim(path)
      if stateful:
        export.state_size(path)
      raise errors.TeacherError(
        f"teacher SavedModel {path} cannot be loaded: delete its generation "
        "directory (its DONE marker) to retrain it, or use --overwrite"
      ) from None
    out = export.verify_saved_model(path, loaded=loaded)  # the copy that teaches is checked
    if expected_classes is not None and out.shape[-1] != expected_classes:
      raise errors.TeacherError(
        f"teacher {path} outputs {out.shape[-1]} classes but the student has {expected_classes}: "
        "use a teacher trained on the same data set"
      )
    feature_dim = export.teacher_feature_dim(path, loaded=loaded) if with_features else None
    state_size = export.state_size(path, loaded=loaded) if stateful else None
    if stateful:
      key, probabilities = choose_output(list(_concrete(fn).structured_outputs))

      def read(x, state):
        if state is None:  # a window on its own: the zero state (what `serve` computes)
          state = tf.zeros([tf.shape(x)[0], state_size])
        res = fn(x, state)
        return res[key], None, res["state"]
    elif with_features:
      probabilities = False

      def read(x, state):
        del state
        res = fn(_float32_input(x))
        return res["logits"], res["features"], None
    else:
      probabilities = False

      def read(x, state):
        del state
        return fn(_float32_input(x)), None, None

    teacher = cls(
      read,
      probabilities=probabilities,
      variables=_concrete(fn).variables,  # what the endpoint reads
      source_path=os.path.abspath(path),
      feature_dim=feature_dim,
      state_size=state_size,
      compute_dtype_found=export.compute_dtype_of(fn),
      owner=loaded,
    )
    student_dtype = keras.mixed_precision.global_policy().compute_dtype
    if teacher.compute_dtype_found == "float32" and student_dtype != "float32":
      logging.warning(
        "teacher %s computes in float32 while the student computes in %s: it was exported "
        "without --mixed_precision; the distillation step is slower than it need be",
        path,
        student_dtype,
      )
    return teacher

  @classmethod
  def signature(cls, loaded, input_name, input_dtype, key, outputs="logits"):
    """A SavedModel's `serving_default` (`loaded`: tf.saved_model.load of it), called by
    its input name `input_name` with the inputs cast to `input_dtype`, reading output
    `key` as `outputs` ("logits" or "probabilities")."""
    check_outputs(outputs)
    fn = loaded.signatures["serving_default"]

    def read(x, state):
      del state
      return fn(**{input_name: tf.cast(x, input_dtype)})[key], None, None

    return cls(
      read,
      probabilities=outputs == "probabilities",
      variables=fn.variables,
      compute_dtype_found=export.compute_dtype_of(fn),
      owner=loaded,
    )

  @classmethod
  def wrap(cls, model, outputs="logits", stateful=False):
    """A keras.Model, keras.layers.TFSMLayer or callable (x -> outputs) as a Teacher.

    `outputs`: what an unnamed output is ("logits" or "probabilities"). A dict output
    is read by name (choose_output), chosen once: from the model's output structure
    where it is known (a TFSMLayer's endpoint, a functional model), else at the first
    call. "features", when the dict has it, is handed on as Outputs.features.
    `stateful`: `model` maps [x, state] -> [outputs, state] (lm_models.stateful).
    A Teacher is returned as it is. The model is set non-trainable.

    Raises:
      ValueError: `outputs` is neither "logits" nor "probabilities", or a dict output
        has several entries and none is named logits or probabilities.
    """
    check_outputs(outputs)
    if isinstance(model, Teacher):
      return model
    if isinstance(model, keras.layers.Layer):
      model.trainable = False
    if stateful:

      def read_stateful(x, state):
        out, new_state = model([x, state], training=False)
        return out, None, new_state

      return cls(read_stateful, probabilities=outputs == "probabilities", variables=model.variables)
    chosen = {}  # key and kind, decided once
    keys = _output_keys(model)
    if keys is not None:
      chosen["key"], chosen["probabilities"] = choose_output(keys, outputs)

    def read(x, state):
      del state
      out = model(x, training=False)
      if not isinstance(out, dict):
        return out, None, None
      if "key" not in chosen:
        chosen["key"], probabilities = choose_output(list(out), outputs)
        teacher.probabilities = probabilities
      return out[chosen["key"]], out.get("features"), None

    teacher = cls(
      read,
      probabilities=chosen.get("probabilities", outputs == "probabilities"),
      variables=getattr(model, "variables", ()),
      owner=model,
    )
    return teacher


def _concrete(fn):
  """A restored endpoint's (first) concrete function; a signature is one already."""
  return fn if hasattr(fn, "structured_outputs") else fn.concrete_functions[0]


def _output_keys(model):
  """The keys of `model`'s dict output when known without calling it; else None."""
  fn = getattr(model, "call_endpoint_fn", None)  # keras.layers.TFSMLayer (public attribute)
  if fn is not None:
    out = _concrete(fn).structured_outputs
    return list(out) if isinstance(out, dict) else None
  return None


class TeacherLayer(keras.layers.Layer):
  """A Teacher as a float32 Keras layer: x -> its logits (for export and evaluation).

  `output_shape`: one example's output shape (DataSpec.output_shape).
  """

  def __init__(self, teacher, output_shape, **kwargs):
    super().__init__(trainable=False, dtype="float32", **kwargs)
    self.teacher = teacher
    self.example_output_shape = tuple(output_shape)

  def call(self, x, training=False):  # pylint: disable=unused-argument
    return self.teacher(x).logits

  def compute_output_shape(self, input_shape):
    return (input_shape[0],) + self.example_output_shape
