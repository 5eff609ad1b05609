"""teacher.Teacher, the one teacher feed, and carry.py (what a task does with state).

Every teacher kind gives exactly (bit for bit) the float32 outputs of calling its model
or endpoint directly, which is what the Distiller read before Teacher existed (a
TFSMLayer on the endpoint, cast to float32; log(max(p, 1e-30)) for probabilities).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import carry
from ban_tf import config
from ban_tf import distiller
from ban_tf import errors
from ban_tf import export
from ban_tf import lm_models
from ban_tf import models
from ban_tf import tasks
from ban_tf import teacher as teacher_lib
from tests.conftest import strategy_for

SHAPE = (8, 8, 3)
Teacher = teacher_lib.Teacher


def _net(seed=0, name="net"):
  keras.utils.set_random_seed(seed)
  return models.build_model("wrn-10-1", 5, SHAPE, name=name)  # has a "features" layer


def _x(n=6, seed=1):
  return np.random.RandomState(seed).uniform(0, 255, (n,) + SHAPE).astype(np.float32)


def _probs(net):
  return keras.Model(net.inputs, keras.layers.Softmax()(net.outputs[0]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A ban_tf generation, a plain Keras export, and a BANE-style probabilities SavedModel."""
  root = tmp_path_factory.mktemp("teachers")
  net = _net()
  export.export_saved_model(net, str(root / "gen"), SHAPE)
  net.export(str(root / "plain"), verbose=False)
  export.export_saved_model(
    _probs(net), str(root / "ensemble"), SHAPE, output_name=export.PROBABILITIES
  )
  net.save(str(root / "net.keras"))
  return root, net


def _eq(got, want):
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- every kind: the logits of calling the model directly, bit for bit -----------------
@pytest.mark.slow
def test_generation_savedmodel_logits_and_facts(saved):
  root, net = saved
  path = str(root / "gen")
  x = tf.constant(_x())
  t = Teacher.load(path, expected_classes=5)
  out = t(x)
  assert out.logits.dtype == tf.float32 and out.features is None and out.state is None
  ref = tf.saved_model.load(path)  # kept alive while its functions are called
  _eq(out.logits, ref.serve(x))
  # Today's path before Teacher: a TFSMLayer on `serve`.
  _eq(out.logits, keras.layers.TFSMLayer(path, call_endpoint="serve", dtype="float32")(x))
  np.testing.assert_allclose(out.logits, net(x, training=False), atol=1e-5)
  assert t.source_path == os.path.abspath(path) and t.compute_dtype_found == "float32"
  assert t.variables and t.trainable_variables == []


@pytest.mark.slow
def test_generation_savedmodel_features(saved):
  root, net = saved
  path = str(root / "gen")
  x = tf.constant(_x())
  t = Teacher.load(path, with_features=True)
  out = t(x)
  ref = tf.saved_model.load(path)
  both = ref.logits_and_features(x)
  _eq(out.logits, both["logits"])
  _eq(out.features, both["features"])
  assert t.feature_dim == net.get_layer("features").output.shape[-1] == out.features.shape[-1]


@pytest.mark.slow
def test_plain_savedmodel_signature_logits_and_probabilities(saved):
  root, net = saved
  x = tf.constant(_x())
  plain = tf.saved_model.load(str(root / "plain"))
  sig = plain.signatures["serving_default"]
  ((name, spec),) = sig.structured_input_signature[1].items()
  (key,) = sig.structured_outputs
  t = Teacher.signature(plain, name, spec.dtype, key)
  _eq(t(x).logits, sig(**{name: x})[key])
  ens = tf.saved_model.load(str(root / "ensemble"))
  sig = ens.signatures["serving_default"]
  t = Teacher.signature(ens, "pixels", tf.float32, "probabilities", "probabilities")
  p = sig(pixels=x)["probabilities"]
  _eq(t(x).logits, tf.math.log(tf.maximum(p, 1e-30)))  # pretrained's former _Signature
  np.testing.assert_allclose(t(x).logits, np.log(_probs(net)(x).numpy()), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_keras_model_keras_file_and_tfsmlayer_wrapped(saved):
  root, net = saved
  x = tf.constant(_x())
  want = tf.cast(net(x, training=False), tf.float32)
  _eq(Teacher.wrap(net)(x).logits, want)
  loaded = keras.saving.load_model(str(root / "net.keras"), compile=False)
  _eq(Teacher.wrap(loaded)(x).logits, tf.cast(loaded(x, training=False), tf.float32))
  probs = _probs(net)
  _eq(
    Teacher.wrap(probs, "probabilities")(x).logits,
    teacher_lib.log_probabilities(tf.cast(probs(x, training=False), tf.float32)),
  )
  for name in ("gen", "plain"):  # {"logits"} and {"output_0"}: read as logits
    layer = keras.layers.TFSMLayer(str(root / name), call_endpoint="serving_default")
    t = Teacher.wrap(layer)
    assert not t.probabilities and not layer.trainable
    _eq(t(x).logits, next(iter(layer(x).values())))
  layer = keras.layers.TFSMLayer(str(root / "ensemble"), call_endpoint="serving_default")
  t = Teacher.wrap(layer)
  assert t.probabilities  # decided from the endpoint's outputs, before any call
  _eq(t(x).logits, teacher_lib.log_probabilities(layer(x)["probabilities"]))
  assert Teacher.wrap(t) is t
  with pytest.raises(ValueError, match="teacher_outputs='softmax'"):
    Teacher.wrap(net, "softmax")


class _Reordered(tf.Module):
  """A SavedModel whose serving_default returns a dict in an unexpected key order."""

  def __init__(self, net, keys):
    super().__init__()
    self.net, self.keys = net, keys

  @tf.function(input_signature=[tf.TensorSpec((None,) + SHAPE, tf.float32, name="pixels")])
  def serve(self, pixels):
    z = self.net(pixels, training=False)
    values = {"a_first": z * 0.0 + 99.0, "features": z[:, :2], "logits": z, "zz_last": -z}
    return {k: values[k] for k in self.keys}


@pytest.mark.parametrize(
  "keys", [("zz_last", "logits", "a_first"), ("features", "logits"), ("logits", "features")]
)
def test_distiller_reads_the_logits_whatever_the_key_order(tmp_path, keys):
  net = _net(3, "reordered")
  module = _Reordered(net, keys)
  path = str(tmp_path / "sm")
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  x = tf.constant(_x())
  layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
  model = distiller.Distiller(_net(4, "student"), layer)
  want = net(x, training=False)
  _eq(model.teacher_logits(x), want)
  _eq(tf.function(model.teacher_logits)(x), want)  # inside a compiled function too


def test_several_unnamed_outputs_are_refused_when_wrapped(tmp_path):
  net = _net(3, "two")
  module = _Reordered(net, ("a_first", "zz_last"))
  path = str(tmp_path / "sm")
  tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
  layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
  with pytest.raises(ValueError, match="name the logits 'logits'"):
    distiller.Distiller(_net(4, "student"), layer)


def test_distiller_step_has_no_teacher_kind_branches():
  """The Distiller only calls its Teacher: no dict keys or output kinds in its source."""
  src = open(distiller.__file__).read()
  for text in ('["logits"]', '["probabilities"]', '["features"]', "isinstance(out, dict)"):
    assert text not in src, text


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.slow
def test_targets_under_replicas_are_todays_bit_for_bit(saved, replicas):
  """Each replica's targets: exactly what today's TFSMLayer gave there (and, up to the
  kernels' batch-size rounding, the one-device endpoint's)."""
  root, _ = saved
  path = str(root / "gen")
  x = _x(6, seed=2)
  ref = tf.saved_model.load(path)
  want = ref.serve(tf.constant(x)).numpy()
  strategy = strategy_for(replicas)
  t = Teacher.load(path, strategy)
  with strategy.scope():
    layer = keras.layers.TFSMLayer(path, call_endpoint="serve", trainable=False, dtype="float32")
  ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(6))

  @tf.function
  def step(v):
    return strategy.run(
      lambda xs: (t(xs).logits, tf.stop_gradient(tf.cast(layer(xs, training=False), tf.float32))),
      args=(v,),
    )

  got, before = step(next(iter(ds)))
  got, before = (
    np.concatenate([r.numpy() for r in strategy.experimental_local_results(v)])
    for v in (got, before)
  )
  _eq(got, before)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  if replicas == 1:
    _eq(got, want)


# ---- carried state -----------------------------------------------------------------------
VOCAB = ("<unk>", "<eos>") + tuple(f"w{i}" for i in range(9))


@pytest.fixture(scope="module")
def lm_saved(tmp_path_factory):
  keras.utils.set_random_seed(0)
  model = lm_models.build_model("lstm-1-8", VOCAB)
  spec = tasks.DataSpec(
    name="toy",
    input_shape=(4,),
    input_dtype="int32",
    input_high=len(VOCAB),
    input_name="tokens",
    serving_shape=(None,),
    num_outputs=len(VOCAB),
    output_shape=(None, len(VOCAB)),
    output_unit="words",
  )
  path = str(tmp_path_factory.mktemp("lm") / "saved_model")
  export.export_saved_model(model, path, spec=spec, stateful=lm_models.stateful(model))
  return path, model


def test_stateful_teacher_hands_on_the_next_state(lm_saved):
  path, model = lm_saved
  t = Teacher.load(path, expected_classes=len(VOCAB), stateful=True)
  assert t.state_size == 16
  ids = np.random.RandomState(3).randint(0, len(VOCAB), (2, 8)).astype(np.int32)
  ref_model = tf.saved_model.load(path)
  endpoint = ref_model.serve_stateful
  s = tf.zeros([2, 16])
  s_ref = s
  for a in (0, 4):
    x = tf.constant(ids[:, a : a + 4])
    out = t(x, s)
    ref = endpoint(x, s_ref)
    _eq(out.logits, ref["logits"])
    _eq(out.state, ref["state"])
    s, s_ref = out.state, ref["state"]
  # What a stateful Keras model hands on, wrapped, is the same.
  w = Teacher.wrap(lm_models.stateful(model), stateful=True)
  out = w(tf.constant(ids[:, :4]), tf.zeros([2, 16]))
  np.testing.assert_allclose(
    out.state, t(tf.constant(ids[:, :4]), tf.zeros([2, 16])).state, atol=1e-6
  )


def test_tasks_say_what_is_carried_and_generic_code_is_told(lm_saved):
  path, _ = lm_saved
  lm, image = tasks.get("lm"), tasks.get("image")
  carry_cfg = config.Config(task="lm", lm_state="carry")
  assert isinstance(lm.carry(carry_cfg), carry.Carry)
  assert type(lm.carry(config.Config(task="lm", lm_state="reset"))) is carry.Reset
  assert type(image.carry(config.Config())) is carry.Reset
  fail = errors.TeacherError
  carry.Reset().check_foreign_teacher(fail)  # nothing to refuse
  with pytest.raises(fail, match="--lm_state=carry feeds the teacher"):
    lm.carry(carry_cfg).check_foreign_teacher(fail)
  old = tf.Module()
  with pytest.raises(fail, match="serves no 'serve_stateful' endpoint"):
    lm.carry(carry_cfg).check_generation_teacher(old, fail)
  # Teachers: `serve` when nothing is carried, `serve_stateful` when it is.
  assert Teacher.load(path).state_size is None
  t = lm.carry(carry_cfg).load_teacher(path, None)
  assert t.state_size == 16
  keras.utils.set_random_seed(1)
  student = lm_models.build_model("lstm-1-8", VOCAB)
  assert carry.Reset().training_state(student, 4, 2, t) is None
  state = lm.carry(carry_cfg).training_state(student, 4, 2, t)
  assert isinstance(state, distiller.CarriedState) and state.teacher is t
  assert state.teacher_state.shape == (4, 16) and state.student_state.shape == (4, 16)
  # Ensembles: a member without a stateful form is named by its position.
  with pytest.raises(carry.MissingState) as e:
    lm.carry(carry_cfg).ensemble(
      [student, keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])], list
    )
  assert e.value.index == 1
  assert carry.Reset().ensemble([student], list) is None
