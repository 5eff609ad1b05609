"""Golden values of the per-example objectives against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from ban_tf import losses


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_kd(t, s, temp):
  """T^2 * cross-entropy(softmax(t/T), softmax(s/T)), per example."""
  return -(temp**2) * (np_softmax(t / temp) * np_log_softmax(s / temp)).sum(-1)


def np_ce(y, s):
  return -np_log_softmax(s)[np.arange(len(y)), y]


@pytest.fixture
def logits():
  rng = np.random.RandomState(0)
  return (
    rng.normal(0, 3, (6, 5)).astype(np.float32),
    rng.normal(0, 3, (6, 5)).astype(np.float32),
    rng.randint(0, 5, 6),
  )


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_matches_numpy(logits, temperature):
  t, s, _ = logits
  got = losses.kd(tf.constant(t), tf.constant(s), temperature).numpy()
  np.testing.assert_allclose(
    got, np_kd(t.astype(np.float64), s.astype(np.float64), temperature), rtol=1e-5
  )


def test_kd_hand_computed_value():
  # One example, two classes, T=1: p = softmax([0, 0]) = [.5, .5], q = softmax([0, ln 3]) = [.25, .75]
  # CE = -(.5 ln .25 + .5 ln .75) = 0.8369882167858358
  got = losses.kd(tf.constant([[0.0, 0.0]]), tf.constant([[0.0, np.log(3.0)]]), 1.0).numpy()
  np.testing.assert_allclose(got, [0.8369882167858358], rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_gradient_is_T_times_q_minus_p(logits, temperature):
  """d/dz T^2 CE(p_T, q_T) = T (q_T - p_T): the reason for the T^2 factor."""
  t, s, _ = logits
  s_var = tf.Variable(s)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(losses.kd(tf.constant(t), s_var, temperature))
  grad = tape.gradient(loss, s_var).numpy()
  want = temperature * (np_softmax(s / temperature) - np_softmax(t / temperature))
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_kd_is_minimised_by_the_teacher(logits):
  t, s, _ = logits
  at_teacher = losses.kd(tf.constant(t), tf.constant(t)).numpy()
  elsewhere = losses.kd(tf.constant(t), tf.constant(s)).numpy()
  entropy = -(np_softmax(t) * np_log_softmax(t)).sum(-1)
  np.testing.assert_allclose(at_teacher, entropy, rtol=1e-5)  # CE(p, p) = H(p)
  assert np.all(elsewhere >= at_teacher - 1e-6)


def test_label_ce_matches_numpy(logits):
  _, s, y = logits
  np.testing.assert_allclose(
    losses.label_ce(tf.constant(y), tf.constant(s)).numpy(), np_ce(y, s), rtol=1e-5
  )


def test_teacher_is_never_differentiated(logits):
  t, s, _ = logits
  t_var = tf.Variable(t)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(losses.kd(t_var, tf.constant(s), 2.0)) + tf.reduce_sum(
      losses.cwtm_weights(t_var)
    )
  assert tape.gradient(loss, t_var) is None


def test_cwtm_weights_are_teacher_max_probability(logits):
  t, _, _ = logits
  np.testing.assert_allclose(
    losses.cwtm_weights(tf.constant(t)).numpy(), np_softmax(t).max(-1), rtol=1e-5
  )


def test_dkpp_keeps_argmax_and_multiset():
  rng = np.random.RandomState(1)
  probs = np_softmax(rng.normal(0, 2, (32, 10))).astype(np.float32)
  out = losses.dkpp_permute(tf.constant(probs), tf.constant([3, 4], tf.int64)).numpy()
  np.testing.assert_array_equal(out.argmax(-1), probs.argmax(-1))
  np.testing.assert_array_equal(out.max(-1), probs.max(-1))
  np.testing.assert_array_equal(np.sort(out, -1), np.sort(probs, -1))
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  assert (out != probs).any(axis=-1).sum() >= 30  # nearly every row is actually permuted


def test_agreement():
  t = tf.constant([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
  s = tf.constant([[3.0, 0.0], [1.0, 0.0], [2.0, 5.0]])
  np.testing.assert_array_equal(losses.agreement(t, s).numpy(), [1.0, 0.0, 0.0])
