"""CWTM, DKPP and activation matching are exact: NumPy goldens, invariants, replicas.

The ban / ban_l / kd objectives and their replica equality are tested elsewhere.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import config as config_lib
from ban_tf import distiller as distiller_lib
from ban_tf import losses
from tests.conftest import strategy_for

C = 10


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(rng, b, scale=3.0):
  return (scale * rng.standard_normal((b, C))).astype("float32")


def _small(name, features=6, dict_out=False):
  """A BN-free functional net on 8x8x1 images: conv, pooled "features", "logits"."""
  x = keras.Input((8, 8, 1), name="pixels")
  h = keras.layers.Conv2D(4, 3, activation="tanh", name="stem")(x)
  h = keras.layers.Conv2D(features, 3, activation="tanh", name="conv2")(h)
  f = keras.layers.GlobalAveragePooling2D(name="features")(h)
  z = keras.layers.Dense(C, name="logits")(f)
  return keras.Model(x, {"logits": z, "features": f} if dict_out else z, name=name)


def _distiller(loss, **kw):
  return distiller_lib.Distiller(_small("s"), _small("t"), loss=loss, **kw)


# ---- CWTM -------------------------------------------------------------------


def test_cwtm_weights_are_teacher_max_prob():
  t = _logits(np.random.default_rng(0), 16)
  np.testing.assert_allclose(losses.cwtm_weights(t), _softmax(t).max(-1), rtol=1e-6)


def test_cwtm_loss_and_gradient_golden():
  rng = np.random.default_rng(1)
  z, t = _logits(rng, 32), _logits(rng, 32)
  y = rng.integers(0, C, 32)
  d = _distiller("cwtm")
  z_v, t_v = tf.Variable(z), tf.Variable(t)
  with tf.GradientTape(persistent=True) as tape:
    terms = d._terms(None, tf.constant(y), z_v, t_v)
  w = _softmax(t).max(-1)
  q = _softmax(z)
  ce = -np.log(q[np.arange(32), y])
  np.testing.assert_allclose(terms["label"], (w * ce).sum() / w.sum(), rtol=1e-5)
  assert float(terms["kd"]) == 0.0
  assert d.kd_weight == 0.0 and d.label_weight == 1.0
  # Eq. 10: dL/dz_s = w_s / sum_u w_u * (q_s - onehot(y_s)).
  expected = (w / w.sum())[:, None] * (q - np.eye(C)[y])
  np.testing.assert_allclose(tape.gradient(terms["label"], z_v), expected, atol=1e-6)
  # The teacher is never differentiated.
  assert tape.gradient(terms["label"], t_v) is None


def test_cwtm_config_is_labels_only():
  cfg = config_lib.Config(loss="cwtm", kd_weight=0.7)
  assert cfg.objective().kd_weight == 0.0 and cfg.objective().label_weight == 1.0


def _one_step(strategy, init, teacher_init, data, **kw):
  """Builds a Distiller under `strategy`, runs one SGD step on one global batch."""
  x, y = data
  with strategy.scope():
    student = _small("s")
    student.set_weights(init)
    teacher = _small("t", dict_out=kw.get("feature_weight", 0) > 0)
    teacher.set_weights(teacher_init)
    d = distiller_lib.Distiller(student, teacher, weight_decay=1e-2, seed=3, **kw)
    d.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
    d.optimizer.build(d.train_variables)  # as train.py does
  ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
  hist = d.fit(ds, epochs=1, verbose=0, shuffle=False)
  return [w.numpy() for w in d.train_variables], hist.history["loss"][0]


@pytest.mark.parametrize(
  "kw",
  [
    {"loss": "cwtm"},
    {"loss": "ban", "feature_weight": 2.0},
    {"loss": "ban", "feature_weight": 2.0, "feature_projection": 6},
  ],
  ids=["cwtm", "features", "features_projection"],
)
@pytest.mark.slow
def test_two_replica_update_equals_one_replica(kw):
  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
  y = rng.integers(0, C, 16).astype("int32")
  keras.utils.set_random_seed(5)
  init = _small("s").get_weights()
  teacher_init = [3 * w for w in _small("t").get_weights()]  # confident, varied max-probs
  keras.utils.set_random_seed(6)  # same projection initialisation in both runs
  one, loss1 = _one_step(tf.distribute.get_strategy(), init, teacher_init, (x, y), **kw)
  keras.utils.set_random_seed(6)
  mirrored = strategy_for(2)
  assert mirrored.num_replicas_in_sync == 2
  two, loss2 = _one_step(mirrored, init, teacher_init, (x, y), **kw)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(one, init))
  assert moved > 1e-3  # the step did something
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss1, loss2, rtol=1e-5)


# ---- DKPP -------------------------------------------------------------------


def _perm_of(before, after):
  """For distinct row values: position i of `after` holds before[perm[i]]."""
  return tuple(int(np.flatnonzero(before == v)[0]) for v in after)


def _probs(b, seed=3):
  return _softmax(_logits(np.random.default_rng(seed), b))


def test_dkpp_invariants():
  p = _probs(64)
  out = losses.dkpp_permute(tf.constant(p), tf.constant([7, 11], tf.int64)).numpy()
  rows = np.arange(64)
  top = p.argmax(-1)
  np.testing.assert_array_equal(out.argmax(-1), top)  # argmax index unchanged
  np.testing.assert_array_equal(out[rows, top], p[rows, top])  # and its value
  np.testing.assert_array_equal(np.sort(out, -1), np.sort(p, -1))  # same multiset per row
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
  perms = [_perm_of(p[i], out[i]) for i in rows]
  assert sum(perm != tuple(range(C)) for perm in perms) >= 60  # not the identity
  assert len(set(perms)) == 64  # each row has its own permutation (9! choices)
  # The argmax is a fixed point of each permutation.
  assert all(perm[t] == t for perm, t in zip(perms, top))


def test_dkpp_permutation_is_uniform_over_non_argmax_slots():
  row = _probs(1)[0]
  p = np.tile(row, (1800, 1))
  out = losses.dkpp_permute(tf.constant(p), tf.constant([1, 2], tf.int64)).numpy()
  top = int(row.argmax())
  src = next(i for i in range(C) if i != top)  # where does this value land?
  dest = np.array([int(np.flatnonzero(o == row[src])[0]) for o in out])
  counts = np.bincount(dest, minlength=C)
  assert counts[top] == 0
  others = np.delete(counts, top)
  assert others.min() > 120 and others.max() < 280, counts  # expected 200 each


def test_dkpp_seeded():
  p = tf.constant(_probs(32))
  a = losses.dkpp_permute(p, tf.constant([5, 0], tf.int64)).numpy()
  b = losses.dkpp_permute(p, tf.constant([5, 0], tf.int64)).numpy()
  c = losses.dkpp_permute(p, tf.constant([5, 1024], tf.int64)).numpy()  # next step
  d = losses.dkpp_permute(p, tf.constant([6, 0], tf.int64)).numpy()  # other seed
  np.testing.assert_array_equal(a, b)
  assert (a != c).any(axis=-1).sum() >= 28
  assert (a != d).any(axis=-1).sum() >= 28


def test_dkpp_distiller_loss_golden_and_fresh_per_step():
  rng = np.random.default_rng(4)
  z, t = _logits(rng, 16), _logits(rng, 16)
  y = tf.constant(rng.integers(0, C, 16))
  d = _distiller("dkpp", seed=9)
  d.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1))
  d.optimizer.iterations.assign(3)
  kd3 = float(d._terms(None, y, tf.constant(z), tf.constant(t))["kd"])
  again = float(d._terms(None, y, tf.constant(z), tf.constant(t))["kd"])
  target = losses.dkpp_permute(
    tf.constant(_softmax(t)), tf.constant([9, 3 * 1024], tf.int64)
  ).numpy()
  golden = -(target * np.log(_softmax(z))).sum(-1).mean()
  np.testing.assert_allclose(kd3, golden, rtol=1e-5)
  assert kd3 == again  # same seed and step: same permutation
  d.optimizer.iterations.assign(4)
  kd4 = float(d._terms(None, y, tf.constant(z), tf.constant(t))["kd"])
  assert abs(kd4 - kd3) > 1e-4  # a fresh permutation each step
  assert float(d._terms(None, y, tf.constant(z), tf.constant(t))["label"]) == 0.0  # no labels
  assert config_lib.Config(loss="dkpp").objective().label_weight == 0.0


# ---- activation matching ----------------------------------------------------------


def test_feature_l2_golden():
  rng = np.random.default_rng(5)
  fs = rng.standard_normal((8, 12)).astype("float32")
  ft = rng.standard_normal((8, 12)).astype("float32")
  np.testing.assert_allclose(losses.feature_l2(fs, ft), ((fs - ft) ** 2).mean(-1), rtol=1e-6)
  d = _distiller("ban", feature_weight=1.0, feature_projection=12)
  kernel, bias = d.projection.get_weights()
  proj = fs[:, :6] @ kernel + bias
  np.testing.assert_allclose(
    d.feature_term(tf.constant(fs[:, :6]), tf.constant(ft)), ((proj - ft) ** 2).mean(), rtol=1e-5
  )
  # Teacher features are constants for the student.
  ft_v = tf.Variable(ft)
  with tf.GradientTape() as tape:
    val = losses.feature_l2(tf.constant(fs), ft_v)
  assert tape.gradient(val, ft_v) is None
