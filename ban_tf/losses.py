"""Per-example distillation objectives: pure functions of logits and labels.

Every function returns a per-example vector [B]; the reduction over the (global,
multi-replica) batch lives in `distiller.py`, so these are easy to check against
NumPy and carry no distribution logic.

Notation: student logits z, teacher logits t, temperature T, labels y.

* label_ce        CE(y, softmax(z))                        = -log softmax(z)_y
* kd              T^2 * CE(softmax(t/T), softmax(z/T))     = -T^2 sum_i p_i log q_i
  The paper's BAN objective is this cross-entropy at T=1 (Eq. 2). It differs from
  KL(p || q) only by the teacher's entropy, a constant for the student, so the
  gradients are identical. The T^2 factor (Hinton et al. 2015) keeps the gradient
  magnitude of the soft term independent of T, because d/dz of the softened CE
  scales as 1/T^2; at T=1 it is 1.
* cwtm weights    max_j softmax(t)_j per example (Eq. 10); normalised over the global
  batch by the caller.
* dkpp target     softmax(t/T) with the argmax entry kept and the other n-1 entries
  randomly permuted within each row (Eq. 11).
* feature_l2      (1/D) ||f_s - f_t||^2: mean squared difference of the student's and
  the teacher's D-dimensional penultimate ("features") activations per example, so
  the scale does not grow with D (activation matching, paper section 4.1).
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Objective:
  """What one generation optimises, resolved once (config.Config.objective).

  kd_weight * kd (or dkpp) + label_weight * label_ce (+ feature_weight * feature_l2);
  cwtm: the label term weighted per example by the teacher's confidence. The
  teacher (generation 0) and the --baseline use `Objective.labels_only()`.
  `to_dict()` is what metrics.json records.
  """

  loss: str = "labels"  # labels | ban | ban_l | kd | cwtm | dkpp
  temperature: float = 1.0
  kd_weight: float = 0.0
  label_weight: float = 1.0
  feature_weight: float = 0.0
  feature_projection: bool = False
  share_stem_head: bool = False

  @classmethod
  def labels_only(cls) -> "Objective":
    return cls()

  @property
  def uses_teacher(self) -> bool:
    return self.loss != "labels"

  def to_dict(self) -> dict:
    if not self.uses_teacher:  # as metrics.json always recorded it for teachers and baselines
      return {"loss": "labels", "temperature": 1.0, "kd_weight": 0.0, "label_weight": 1.0}
    return dataclasses.asdict(self)


def label_ce(labels, student_logits):
  """Sparse cross-entropy of integer labels [B] against logits [B, C]."""
  labels = tf.cast(labels, tf.int32)
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
    labels=labels, logits=tf.cast(student_logits, tf.float32)
  )


def soft_ce(target_probs, student_logits, temperature=1.0):
  """T^2 * CE(target, softmax(z/T)) per example; target is a probability matrix."""
  t = tf.cast(temperature, tf.float32)
  log_q = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / t, axis=-1)
  return -(t * t) * tf.reduce_sum(tf.cast(target_probs, tf.float32) * log_q, axis=-1)


def teacher_probs(teacher_logits, temperature=1.0):
  """softmax(t/T), never differentiated (the teacher is fixed)."""
  t = tf.cast(temperature, tf.float32)
  return tf.stop_gradient(tf.nn.softmax(tf.cast(teacher_logits, tf.float32) / t, axis=-1))


def kd(teacher_logits, student_logits, temperature=1.0):
  """Hinton/BAN knowledge-distillation term: T^2 CE(softmax(t/T), softmax(z/T))."""
  return soft_ce(teacher_probs(teacher_logits, temperature), student_logits, temperature)


def cwtm_weights(teacher_logits):
  """Teacher max probability per example (un-normalised CWTM weight)."""
  return tf.reduce_max(teacher_probs(teacher_logits), axis=-1)


def dkpp_permute(probs, seed):
  """Permutes every row's non-argmax entries; the argmax entry stays in place.

  Args:
    probs: [B, C] probabilities.
    seed: int32/int64 tensor of shape [2] for the stateless RNG; the same seed gives
      the same permutations, and each row gets its own permutation.

  Returns:
    [B, C] tensor whose rows hold the same multiset of values as `probs`, with the
    argmax position and value unchanged.
  """
  probs = tf.convert_to_tensor(probs)
  shape = tf.shape(probs)
  num_classes = shape[1]
  top = tf.argmax(probs, axis=-1, output_type=tf.int32)
  is_top = tf.one_hot(top, num_classes, on_value=True, off_value=False)
  positions = tf.broadcast_to(tf.range(num_classes), shape)
  # Source order: the argmax first, then the other classes in ascending order.
  src = tf.argsort(tf.where(is_top, -1, positions), axis=-1, stable=True)
  # Destination order: the argmax first, then the other classes in random order.
  keys = tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)
  dst = tf.argsort(tf.where(is_top, -1.0, keys), axis=-1, stable=True)
  values = tf.gather(probs, src, batch_dims=1)  # values[j] goes to position dst[j]
  inverse = tf.argsort(dst, axis=-1, stable=True)  # position -> slot j
  return tf.gather(values, inverse, batch_dims=1)


def dkpp(teacher_logits, student_logits, seed, temperature=1.0):
  """Cross-entropy to the teacher's permuted predictions (DKPP, no labels)."""
  target = dkpp_permute(teacher_probs(teacher_logits, temperature), seed)
  return soft_ce(target, student_logits, temperature)


def feature_l2(student_features, teacher_features):
  """(1/D) * ||f_s - f_t||^2 per example; the teacher features are not differentiated."""
  t = tf.stop_gradient(tf.cast(teacher_features, tf.float32))
  return tf.reduce_mean(tf.square(tf.cast(student_features, tf.float32) - t), axis=-1)


def agreement(teacher_logits, student_logits):
  """1.0 where the teacher's and the student's top-1 classes match, else 0.0."""
  return tf.cast(
    tf.equal(tf.argmax(teacher_logits, axis=-1), tf.argmax(student_logits, axis=-1)), tf.float32
  )
