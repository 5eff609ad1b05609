"""Distiller: a keras.Model whose train_step fits a student to a frozen teacher.

Generation 0 is the same Distiller with `teacher=None` (labels only), so logging,
metrics and export are shared by every generation.

Loss scaling under tf.distribute. Keras' TF optimizer all-reduces gradients with SUM
across replicas. Every term is therefore written as a per-replica *contribution*:

    contribution_r = sum_{s in replica r} w_s * l_s  /  sum_{s in global batch} w_s

with w_s = 1 for mean losses and w_s = teacher max-probability for CWTM. The global
denominator is a cross-replica all-reduce, so the summed gradients equal the
gradient of the loss on the whole global batch, exactly, whatever the number of
replicas (tested with 1 vs 2 replicas). Weight decay (coupled L2, as in the WRN/
PyTorch recipe) is a global term and contributes 1/num_replicas per replica. Logged
values are the all-reduced (true, global) losses.
"""

import keras
import tensorflow as tf

from ban_tf import losses

SUM = tf.distribute.ReduceOp.SUM


def _global_sum(x):
  ctx = tf.distribute.get_replica_context()
  return ctx.all_reduce(SUM, x) if ctx is not None else x


def _num_replicas():
  ctx = tf.distribute.get_replica_context()
  return ctx.num_replicas_in_sync if ctx is not None else 1


def _replica_id():
  ctx = tf.distribute.get_replica_context()
  rid = ctx.replica_id_in_sync_group if ctx is not None else 0
  return tf.cast(rid, tf.int64)


class Distiller(keras.Model):
  """Trains `student`; `teacher` (or None) is a frozen callable returning logits.

  Args:
    student: a keras.Model mapping raw pixels to logits.
    teacher: None (generation 0: labels only) or a frozen layer/model such as the
      previous generation's SavedModel loaded with keras.layers.TFSMLayer.
    loss: one of ban, ban_l, kd, cwtm, dkpp (see losses.py); ignored without teacher.
    temperature, kd_weight, label_weight: the objective's constants.
    weight_decay: coupled L2 coefficient: adds 0.5 * wd * sum ||w||^2 over the
      student's trainable variables.
    seed: base seed of the DKPP permutation RNG.
  """

  def __init__(self, student, teacher=None, *, loss="ban", temperature=1.0, kd_weight=1.0,
               label_weight=0.0, weight_decay=0.0, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self.loss_name = loss if teacher is not None else "labels"
    self.temperature = float(temperature)
    self.kd_weight = float(kd_weight) if teacher is not None else 0.0
    self.label_weight = float(label_weight) if teacher is not None else 1.0
    if self.loss_name == "cwtm":
      self.kd_weight, self.label_weight = 0.0, 1.0
    self.weight_decay = float(weight_decay)
    self.seed = int(seed)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.kd_tracker = keras.metrics.Mean(name="kd_loss")
    self.label_tracker = keras.metrics.Mean(name="label_loss")
    self.l2_tracker = keras.metrics.Mean(name="l2_loss")
    self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self.agree_tracker = keras.metrics.Mean(name="teacher_agreement")

  @property
  def metrics(self):
    ms = [self.loss_tracker, self.kd_tracker, self.label_tracker, self.l2_tracker, self.acc_tracker]
    return ms + ([self.agree_tracker] if self.teacher is not None else [])

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras' TF trainer (3.15) "symbolically builds" a model created in a strategy
    # scope by eagerly reducing the first input batch across replicas, which fails
    # under MultiWorkerMirroredStrategy (PerReplica inputs cannot be converted).
    # Nothing here needs that build: student, teacher, trackers and optimizer exist
    # before fit, and the step builds the rest when it is traced.
    if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
      return
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  def call(self, x, training=False):
    return self.student(x, training=training)

  def teacher_logits(self, x):
    # The teacher runs in inference mode and is never differentiated.
    return tf.stop_gradient(tf.cast(self.teacher(x, training=False), tf.float32))

  def _terms(self, x, y, logits, t_logits):
    """Per-replica contributions (for gradients) of each loss term."""
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    terms = {"kd": tf.constant(0.0), "label": tf.constant(0.0)}
    if t_logits is not None and self.loss_name == "cwtm":
      w = losses.cwtm_weights(t_logits)
      terms["label"] = tf.reduce_sum(w * losses.label_ce(y, logits)) / _global_sum(tf.reduce_sum(w))
      return terms
    # Every replica issues the same collectives in the same order (a collective
    # that only some code paths create would deadlock or mismatch).
    n_global = _global_sum(tf.cast(tf.shape(y)[0], tf.float32))
    if t_logits is None:
      terms["label"] = tf.reduce_sum(losses.label_ce(y, logits)) / n_global
      return terms
    if self.loss_name == "dkpp":
      step = tf.cast(self.optimizer.iterations, tf.int64)
      seed = tf.stack([tf.constant(self.seed, tf.int64), step * 1024 + _replica_id()])
      kd = losses.dkpp(t_logits, logits, seed, self.temperature)
    else:
      kd = losses.kd(t_logits, logits, self.temperature)
    terms["kd"] = tf.reduce_sum(kd) / n_global
    if self.label_weight > 0:
      terms["label"] = tf.reduce_sum(losses.label_ce(y, logits)) / n_global
    return terms

  def _l2(self):
    if not self.weight_decay:
      return tf.constant(0.0)
    sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in self.student.trainable_variables])
    return 0.5 * self.weight_decay * sq

  def train_step(self, data):
    x, y = data[0], data[1]
    t_logits = self.teacher_logits(x) if self.teacher is not None else None
    with tf.GradientTape() as tape:
      logits = tf.cast(self.student(x, training=True), tf.float32)
      terms = self._terms(x, y, logits, t_logits)
      objective = (self.kd_weight * terms["kd"] + self.label_weight * terms["label"])
      l2 = self._l2()
      contribution = objective + l2 / _num_replicas()
      scaled = self.optimizer.scale_loss(contribution)
    variables = self.student.trainable_variables
    grads = tape.gradient(scaled, variables)
    self.optimizer.apply_gradients(zip(grads, variables))
    if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
      self._average_statistics()
    # Logged values are global (summed over replicas), i.e. the true loss.
    self.loss_tracker.update_state(_global_sum(objective) + l2)
    self.kd_tracker.update_state(_global_sum(terms["kd"]))
    self.label_tracker.update_state(_global_sum(terms["label"]))
    self.l2_tracker.update_state(l2)
    self.acc_tracker.update_state(y, logits)
    if t_logits is not None:
      self.agree_tracker.update_state(losses.agreement(t_logits, logits))
    return self._step_logs({m.name: m.result() for m in self.metrics})

  def test_step(self, data):
    x, y = data[0], data[1]
    logits = tf.cast(self.student(x, training=False), tf.float32)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    ce = losses.label_ce(y, logits)
    self.label_tracker.update_state(ce)
    self.acc_tracker.update_state(y, logits)
    return self._step_logs({"label_loss": self.label_tracker.result(), "accuracy": self.acc_tracker.result()})

  def _average_statistics(self):
    # BatchNorm moving statistics are updated from each worker's own part of the
    # batch, so under MultiWorkerMirroredStrategy they drift apart between workers.
    # Averaging them after every step keeps every worker's model identical; the
    # moving mean is then exactly that of the global batch means (the moving
    # variance averages the per-worker variances). One small batched all-reduce.
    stats = [v for v in self.student.non_trainable_variables if v.dtype == "float32"]
    if stats:
      ctx = tf.distribute.get_replica_context()
      means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in stats])
      for v, m in zip(stats, means):
        v.assign(m)

  def _step_logs(self, logs):
    # Under MultiWorkerMirroredStrategy Keras (3.15) reduces step outputs with
    # strategy.reduce(MEAN, axis=0), which needs a batch axis: give each scalar one.
    if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
      return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs
