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

CWTM: w_s = max_j softmax(t_s)_j; sum_u w_u is all-reduced over replicas before
dividing, so the weights are normalised over the global batch (Eq. 10).
DKPP: the permutation seed is [seed, step * 1024 + replica_id], so every sample of
every step gets a fresh permutation and a rerun with the same seed repeats them (a
different replica count splits the batch differently and so draws differently).
Activation matching (feature_weight > 0): the teacher is called through its
`logits_and_features` endpoint and the term is the global-batch mean of
losses.feature_l2, optionally through a learned Dense projection of the student's
features (`feature_projection`), which is trained with the student but not exported.
Sequence outputs (language models: logits [B, T, V], labels [B, T]) are flattened
to tokens first, so "example" above means *token*: every term is averaged per token
over the global batch, never summed over a sequence (HF transformers #1181), and
the teacher is applied at every unrolled position. `clip_norm` clips the norm of
the global (all-replica) gradient, which needs one extra all-reduce: Keras' own
`global_clipnorm` would clip each replica's partial gradient before the sum.

Evaluation (test_step) updates keras metrics (cross-entropy, accuracy and, with
`perplexity=True` (language models: the task says so), `Perplexity`), weighted by the optional third input element (0 marks the
padding data.py adds to a last batch). Keras sums their totals and counts over
replicas when a step returns exactly `self.metrics`, so evaluate() and fit's
validation report the numbers of every example, as on one device, for any split.
Carried state (`state=`, a CarriedState the task supplies: language models with
--lm_state=carry): the student, and the teacher through its stateful endpoint, carry
their recurrent state from one training batch to the next, row by row (row i of
batch k+1 continues row i of batch k); each replica owns fixed rows of the global
batch and keeps their states in replica-local variables; the state restarts from
zeros at every epoch's first step (a function of the optimizer's step counter, so
resuming from an epoch checkpoint is exact). Evaluation then runs the stream the
data set gives (consecutive [1, T] windows) in order on one device, carrying the
state, and scores every label (`CarriedState.score`).
BatchNorm moving statistics are averaged over replicas after every train step
(`_average_statistics`), so one set exists; models.synchronize_batchnorm
(--sync_batchnorm) makes the batch statistics global instead.
"""

import keras
import numpy as np
import tensorflow as tf

from ban_tf import losses
from ban_tf import teacher as teacher_lib

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


# keras.distillation.Distiller's own arguments: a call meant for it is refused, not misread.
_KERAS_DISTILLER_ARGS = ("distillation_losses", "distillation_loss_weights", "student_loss_weight")


class Distiller(keras.Model):
  """Trains `student`; `teacher` (or None) is a frozen callable returning logits.

  The order is (student, teacher), the reverse of Keras' own
  `keras.distillation.Distiller(teacher, student, distillation_losses, ...)`: name
  them (`Distiller(student=..., teacher=...)`) when both are at hand. Keras'
  argument names (`distillation_losses`, ...) raise a ValueError saying so.

  Args:
    student: a keras.Model mapping raw pixels to logits.
    teacher: None (generation 0: labels only), a teacher.Teacher (Teacher.load of the
      previous generation's SavedModel), or a frozen keras.Model, keras.layers.TFSMLayer
      or callable, which teacher.Teacher.wrap turns into one (what it outputs is decided
      there, once; the step only calls it).
    loss: one of ban, ban_l, kd, cwtm, dkpp (see losses.py); ignored without teacher.
    temperature, kd_weight, label_weight: the objective's constants.
    weight_decay: coupled L2 coefficient: adds 0.5 * wd * sum ||w||^2 over the
      student's trainable variables.
    seed: base seed of the DKPP permutation RNG.
    feature_weight: weight of the activation-matching term (needs a teacher that
      hands on features: Teacher.load(with_features=True)).
    feature_projection: None, or the teacher's feature width: adds a learned Dense
      projection from the student's features to it.
    clip_norm: if > 0, clip the global gradient to this L2 norm (Zaremba et al.): the
      true gradient's norm, also under loss scaling (mixed_float16's LossScaleOptimizer),
      where the scaled gradient is clipped at clip_norm times the loss scale.
    augment: None, or a callable (images, keys) -> float32 images run on each
      training batch inside the compiled step (data.augment_batch); training
      elements are then (images, labels, keys: the example indices, or their crop
      windows), as data.Dataset.train(device_augment=True) makes them.
    state: None, or a CarriedState: the student (and the teacher) carry their
      state across consecutive batches, and evaluation runs over streams.
    perplexity: also report `perplexity` (exp of the mean cross-entropy) in
      evaluation: a language model's metric (tasks/lm.py sets it). Logits of any
      rank are scored per row of the last axis (per example, or per token) either way.
    teacher_outputs: what an unnamed teacher output is: "logits" (default) or
      "probabilities" (e.g. a softmax output), used as log-probabilities, whose
      softmax at every temperature is the one its logits would give. A dict output
      (a TFSMLayer on serving_default) is read by name: "logits", else
      "probabilities" (a ban_tf BANE ensemble), else its only entry.

  Raises:
    ValueError: teacher_outputs is neither "logits" nor "probabilities"; an argument of
      keras.distillation.Distiller.
  """

  def __init__(
    self,
    student,
    teacher=None,
    *,
    loss="ban",
    temperature=1.0,
    kd_weight=1.0,
    label_weight=0.0,
    weight_decay=0.0,
    seed=0,
    feature_weight=0.0,
    feature_projection=None,
    clip_norm=0.0,
    augment=None,
    perplexity=False,
    state=None,
    teacher_outputs="logits",
    **kwargs,
  ):
    keras_args = [k for k in _KERAS_DISTILLER_ARGS if k in kwargs]
    if keras_args:
      raise ValueError(
        f"Distiller: {', '.join(keras_args)} belong to keras.distillation.Distiller(teacher, "
        "student, ...); ban_tf's is Distiller(student, teacher=..., loss=..., temperature=..., "
        "kd_weight=..., label_weight=...): use one or the other"
      )
    super().__init__(**kwargs)
    teacher_lib.check_outputs(teacher_outputs)
    self.state = state
    self.student = student
    # What the teacher outputs is decided here, once (teacher.py): the step only calls it.
    self.teacher = None if teacher is None else teacher_lib.Teacher.wrap(teacher, teacher_outputs)
    self.feature_weight = float(feature_weight) if teacher is not None else 0.0
    self.projection = None
    if self.feature_weight:
      # Shares the student's layers: the same weights, two outputs.
      self.student_with_features = keras.Model(
        student.inputs,
        [student.outputs[0], student.get_layer("features").output],
        name=f"{student.name}_with_features",
      )
      if feature_projection:
        self.projection = keras.layers.Dense(
          int(feature_projection), dtype="float32", name="feature_projection"
        )
        self.projection.build((None, student.get_layer("features").output.shape[-1]))
    self.loss_name = loss if teacher is not None else "labels"
    self.temperature = float(temperature)
    self.kd_weight = float(kd_weight) if teacher is not None else 0.0
    self.label_weight = float(label_weight) if teacher is not None else 1.0
    if self.loss_name == "cwtm":
      self.kd_weight, self.label_weight = 0.0, 1.0
    self.weight_decay = float(weight_decay)
    self.seed = int(seed)
    self.clip_norm = float(clip_norm)
    self.augment = augment
    self.loss_tracker = keras.metrics.Mean(name="loss")
    self.kd_tracker = keras.metrics.Mean(name="kd_loss")
    self.label_tracker = keras.metrics.Mean(name="label_loss")
    self.l2_tracker = keras.metrics.Mean(name="l2_loss")
    self.acc_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self.agree_tracker = keras.metrics.Mean(name="teacher_agreement")
    self.feature_tracker = keras.metrics.Mean(name="feature_loss")
    self.ppl_tracker = Perplexity(name="perplexity")
    self.perplexity = bool(perplexity)
    self._evaluating = False

  @property
  def metrics(self):
    # Keras reads the epoch's numbers from these metrics (variables summed over
    # replicas) only when a step returns exactly their names; otherwise it averages
    # the replicas' step outputs, which is wrong for uneven splits. So the list
    # depends on the mode: evaluation has its own, smaller set (see `evaluate`).
    compiled = [self._compile_metrics] if self._compile_metrics is not None else []
    if self._evaluating:
      return (
        [self.label_tracker, self.acc_tracker]
        + ([self.ppl_tracker] if self.perplexity else [])
        + compiled
      )
    ms = [self.loss_tracker, self.kd_tracker, self.label_tracker, self.l2_tracker, self.acc_tracker]
    ms += [self.feature_tracker] if self.feature_weight else []
    ms += [self.agree_tracker] if self.teacher is not None else []
    # compile(metrics=[...]): extra metrics on (labels as given, student logits).
    return ms + compiled

  # ---- library use: compile, labels, save ---------------------------------------
  def compile(
    self, optimizer="rmsprop", loss=None, *args, metrics=None, weighted_metrics=None, **kwargs
  ):
    """keras.Model.compile, minus the loss (the objective is the Distiller's own).

    `metrics` are extra metrics, updated with the labels as given and the student's
    logits (use their from_logits form where one exists) in fit and evaluate, and
    logged beside the Distiller's own. Raises ValueError for `loss`, `loss_weights`
    or `weighted_metrics`, and for a metric named as one of the Distiller's own
    (e.g. "accuracy"), which would replace it in the logs.
    """
    if loss is not None or kwargs.get("loss_weights") is not None or weighted_metrics is not None:
      raise ValueError(
        "Distiller.compile: loss, loss_weights and weighted_metrics are not used: the objective is "
        "set by Distiller(student, teacher, loss=..., temperature=..., kd_weight=..., label_weight=...); "
        "pass only optimizer=, metrics= and execution options"
      )
    own = {m.name for m in self._own_metrics()}
    for m in keras.tree.flatten(metrics) if metrics is not None else []:
      name = m if isinstance(m, str) else getattr(m, "name", getattr(m, "__name__", None))
      if name in own:
        raise ValueError(
          f"Distiller.compile: metrics=[{m!r}] would be logged as '{name}', the key of the "
          "Distiller's own metric of that name (the student's, on every example): drop it, or "
          "name yours otherwise, e.g. keras.metrics.SparseCategoricalAccuracy(name='top1')"
        )
    super().compile(optimizer, *args, metrics=metrics, **kwargs)

  def _own_metrics(self):
    return [
      self.loss_tracker,
      self.kd_tracker,
      self.label_tracker,
      self.l2_tracker,
      self.acc_tracker,
      self.agree_tracker,
      self.feature_tracker,
      self.ppl_tracker,
    ]

  def save(self, *args, **kwargs):  # pylint: disable=unused-argument
    """Refused: a Distiller is a training harness (student + frozen teacher)."""
    raise NotImplementedError(
      "Distiller.save: save or export the student instead, e.g. distiller.student.save('student.keras') "
      "or ban_tf.export.export_saved_model(distiller.student, 'saved_model', input_shape)"
    )

  def _class_ids(self, y):
    """Sparse class ids from sparse ([N], [N, 1], [N, T]) or one-hot ([N, C]) labels.

    One-hot rows are turned into their argmax; soft labels (rows that are not one-hot)
    fail with an InvalidArgumentError saying so, rather than being silently rounded.
    """
    y = tf.convert_to_tensor(y)
    try:  # a functional or built Sequential student: compare with its logits' shape
      out = self.student.outputs[0].shape
      one_hot = y.shape.rank == len(out) and y.shape[-1] == out[-1] and out[-1] != 1
    except (AttributeError, ValueError, TypeError):  # a subclassed student: float rows are one-hot
      one_hot = y.dtype.is_floating and (y.shape.rank or 0) >= 2 and y.shape[-1] not in (None, 1)
    if one_hot:
      y = tf.cast(y, tf.float32)
      tf.debugging.assert_equal(
        tf.reduce_all((tf.reduce_max(y, -1) == 1.0) & (tf.reduce_sum(y, -1) == 1.0)),
        True,
        message="Distiller: labels with one column per class must be one-hot (soft labels are not "
        "supported): pass class ids or one-hot rows",
      )
      return tf.argmax(y, axis=-1, output_type=tf.int32)
    return y

  def _update_compiled_metrics(self, y, logits, sample_weight=None):
    if self._compile_metrics is not None:
      self._compile_metrics.update_state(y, logits, sample_weight=sample_weight)

  def evaluate(self, *args, **kwargs):
    """keras.Model.evaluate with the evaluation metrics (fit's validation calls it too).

    Inputs may carry a third element, per-example weights: 0 marks padding, which
    data.py adds to the last batch so that every replica gets examples.
    """
    if self.state is not None:  # one stream, in order, carrying the state (one device)
      data = kwargs.get("x", args[0] if args else None)
      res = self.state.score(data)
      res = {k: v for k, v in res.items() if k != "perplexity" or self.perplexity}
      return res if kwargs.get("return_dict") else list(res.values())
    self._evaluating = True
    try:
      return super().evaluate(*args, **kwargs)
    finally:
      self._evaluating = False

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras' TF trainer (3.15) "symbolically builds" a model created in a strategy scope
    # from a first input batch, which it draws from the epoch's distributed iterator and
    # then drops: a second iterator over the same pipeline, alive (prefetching, and
    # writing the evaluation pipeline's shared in-memory cache, data.py) while the one
    # that is scored starts. Under load that intermittently scored a wrong count on 2
    # replicas (issue 23: 388/516 for 379/512). The build only needs the batch's
    # structure, shapes and dtypes, which the pipeline's element_spec gives without
    # drawing anything. Under MultiWorkerMirroredStrategy nothing here needs that build
    # (student, teacher, trackers and optimizer exist before fit, and the step builds
    # the rest when it is traced).
    if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
      return
    if iterator is not None and self._distribute_strategy is not None:
      data_batch = iterator.data_adapter.get_tf_dataset().element_spec
      iterator = None
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  @property
  def train_variables(self):
    """What the optimizer updates: the student (minus frozen layers) and the projection."""
    extra = self.projection.trainable_variables if self.projection is not None else []
    return list(self.student.trainable_variables) + list(extra)

  def call(self, x, training=False):
    if self.augment is not None and keras.backend.standardize_dtype(x.dtype) == "uint8":
      x = keras.ops.cast(x, "float32")  # raw uint8 pixels (device_augment); token ids stay ints
    return self.student(x, training=training)

  def teacher_logits(self, x):
    """The teacher's float32 logits on `x` (teacher.Outputs.logits), never differentiated."""
    return self.teacher(x).logits

  def feature_term(self, s_feats, t_feats):
    """Per-replica contribution of the activation-matching term."""
    if self.projection is not None:
      s_feats = self.projection(tf.cast(s_feats, tf.float32))
    n_global = _global_sum(tf.cast(tf.shape(s_feats)[0], tf.float32))
    return tf.reduce_sum(losses.feature_l2(s_feats, t_feats)) / n_global

  def _terms(self, x, y, logits, t_logits):
    """Per-replica contributions (for gradients) of each loss term."""
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    logits, t_logits = _tokens(logits), (None if t_logits is None else _tokens(t_logits))
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
    sq = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in self.train_variables])
    return 0.5 * self.weight_decay * sq

  def train_step(self, data):
    x, y_given = data[0], data[1]
    y = self._class_ids(y_given)
    if self.augment is not None:  # on-device augmentation of the uint8 batch
      x = self.augment(x, data[2])
    t_logits = t_feats = None
    if self.state is not None:
      reset = tf.equal(self.optimizer.iterations % self.state.steps_per_epoch, 0)
      if self.teacher is not None:
        t_logits = self.state.teacher_step(x, reset)
    elif self.teacher is not None:
      t_logits, t_feats, _ = self.teacher(x)
    with tf.GradientTape() as tape:
      if self.state is not None:
        logits = self.state.student_step(x, reset, training=True)
      elif self.feature_weight:
        logits, s_feats = self.student_with_features(x, training=True)
      else:
        logits = self.student(x, training=True)
      logits = tf.cast(logits, tf.float32)
      terms = self._terms(x, y, logits, t_logits)
      objective = self.kd_weight * terms["kd"] + self.label_weight * terms["label"]
      if self.feature_weight:
        terms["feature"] = self.feature_term(s_feats, t_feats)
        objective += self.feature_weight * terms["feature"]
      l2 = self._l2()
      contribution = objective + l2 / _num_replicas()
      scaled = self.optimizer.scale_loss(contribution)
    variables = self.train_variables
    grads = tape.gradient(scaled, variables)
    if self.clip_norm > 0:  # the gradients are loss-scaled (fp16): clip them at the scaled norm
      grads = _clip_global_norm(grads, self.clip_norm * self.optimizer.scale_loss(1.0))
    self.optimizer.apply_gradients(zip(grads, variables))
    if _num_replicas() > 1:
      self._average_statistics()
    # Logged values are global (summed over replicas), i.e. the true loss.
    self.loss_tracker.update_state(_global_sum(objective) + l2)
    self.kd_tracker.update_state(_global_sum(terms["kd"]))
    self.label_tracker.update_state(_global_sum(terms["label"]))
    self.l2_tracker.update_state(l2)
    if self.feature_weight:
      self.feature_tracker.update_state(_global_sum(terms["feature"]))
    self.acc_tracker.update_state(y, logits)
    if t_logits is not None:
      self.agree_tracker.update_state(losses.agreement(_tokens(t_logits), _tokens(logits)))
    self._update_compiled_metrics(y_given, logits)
    return self._step_logs(self.get_metrics_result())

  def test_step(self, data):
    x, y_given = data[0], data[1]
    weights = data[2] if len(data) > 2 else None  # per example; 0 = padding
    y = self._class_ids(y_given)
    logits = tf.cast(self.student(x, training=False), tf.float32)
    self._update_compiled_metrics(y_given, logits, weights)
    y = tf.reshape(tf.cast(y, tf.int32), [-1])
    logits = _tokens(logits)
    if weights is not None:  # one weight per example [B] -> one per token [B * T]
      weights = tf.reshape(tf.cast(weights, tf.float32), [-1])
      weights = tf.repeat(weights, tf.shape(y)[0] // tf.maximum(tf.shape(weights)[0], 1))
    ce = losses.label_ce(y, logits)
    self.label_tracker.update_state(ce, sample_weight=weights)  # a token mean for language models
    self.acc_tracker.update_state(y, logits, sample_weight=weights)
    if self.perplexity:
      self.ppl_tracker.update_state(ce, sample_weight=weights)
    return self._step_logs(self.get_metrics_result())

  def _average_statistics(self):
    # BatchNorm moving statistics are updated from each replica's own part of the
    # batch, so they drift apart between replicas (MirroredStrategy keeps one copy
    # per device; the SavedModel, model.keras and the checkpoint would save replica
    # 0's while evaluation used each replica's own). Averaging them after every step
    # keeps one set: the moving mean is then exactly that of the global batch means
    # (equal per-replica batches); the moving variance averages the per-replica
    # variances. One small batched all-reduce. With --sync_batchnorm the statistics
    # are already equal; averaging equal values keeps them equal up to rounding.
    stats = moving_statistics(self.student)
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


class CarriedState:
  """The state-carrying hook of a Distiller (--lm_state=carry); generic over stateful models.

  Args:
    student: the stateful student, [x [N, T], state [N, S]] -> [logits [N, T, V],
      state [N, S]] (lm_models.stateful: shares the student's weights).
    state_size: S.
    batch_size: the global training batch (rows); each of the strategy's replicas owns
      batch_size / replicas consecutive rows of it (tf.distribute splits every batch
      that way), and their states.
    steps_per_epoch: the state restarts from zeros at every step that is a multiple of it.
    teacher: None, or a stateful teacher.Teacher (teacher(x, state) -> Outputs with the
      next state: Teacher.load(stateful=True), the SavedModel's `serve_stateful`).
    teacher_state_size: the teacher's S (default: teacher.state_size).

  Create it inside the strategy scope the Distiller is built in. Raises ValueError when
  the batch does not split evenly over the replicas.
  """

  def __init__(
    self, student, state_size, batch_size, steps_per_epoch, teacher=None, teacher_state_size=0
  ):
    strategy = tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
      raise ValueError(
        f"batch size {batch_size} does not split into {replicas} equal replica shares: "
        "carried state needs every replica to own the same rows at every step"
      )
    self.student = student
    self.teacher = teacher
    self.steps_per_epoch = int(steps_per_epoch)
    rows = batch_size // replicas
    # Replica-local (ON_READ): each replica reads and writes its own rows' states.
    # Not checkpointed: checkpoints are taken at epoch ends, where the state restarts.
    local = dict(
      trainable=False,
      synchronization=tf.VariableSynchronization.ON_READ,
      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
    self.student_state = tf.Variable(tf.zeros([rows, state_size]), name="student_state", **local)
    if teacher is not None and not teacher_state_size:
      teacher_state_size = teacher.state_size
    self.teacher_state = (
      tf.Variable(tf.zeros([rows, teacher_state_size]), name="teacher_state", **local)
      if teacher is not None
      else None
    )
    self._score_fn = None

  @staticmethod
  def _read(var, reset):
    value = tf.identity(var)
    return tf.where(reset, tf.zeros_like(value), value)

  def student_step(self, x, reset, training):
    """The student's logits on this replica's rows, from (and updating) their carried state."""
    logits, new = self.student([x, self._read(self.student_state, reset)], training=training)
    self.student_state.assign(tf.stop_gradient(tf.cast(new, tf.float32)))  # truncated BPTT
    return logits

  def teacher_step(self, x, reset):
    """The teacher's float32 logits on this replica's rows, carrying the teacher's own state."""
    out = self.teacher(x, self._read(self.teacher_state, reset))
    self.teacher_state.assign(out.state)
    return out.logits

  def score(self, stream):
    """{"label_loss", "accuracy", "perplexity"} of the student over `stream`.

    `stream`: (x [R, t], y [R, t]) windows in order (text_data: one row, the whole
    split); the state starts at zeros and is carried from window to window. Every
    label counts once; sums in float64.
    """
    if self._score_fn is None:
      model = self.student

      @tf.function(reduce_retracing=True)
      def step(x, y, s):
        logits, s = model([x, s], training=False)
        logits = _tokens(tf.cast(logits, tf.float32))
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        ce = losses.label_ce(y, logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
        return tf.reduce_sum(ce), tf.reduce_sum(correct), tf.cast(tf.shape(y)[0], tf.float32), s

      self._score_fn = step
    ce = correct = count = 0.0
    s = None
    for x, y in stream:
      if s is None:
        s = tf.zeros([tf.shape(x)[0], self.student_state.shape[-1]])
      c, k, n, s = self._score_fn(x, y, s)
      ce, correct, count = ce + float(c), correct + float(k), count + float(n)
    loss = ce / count
    return {
      "label_loss": loss,
      "accuracy": correct / count,
      "perplexity": float(np.exp(min(loss, 700.0))),
    }


class Perplexity(keras.metrics.Mean):
  """exp(mean cross-entropy): the perplexity of everything seen, not a mean of perplexities.

  A keras Mean (total and count summed over replicas), so a multi-replica result is
  exp of the global token mean, as on one device.
  """

  def result(self):
    return tf.exp(super().result())


def probability_scorer(model, perplexity=False, stateful=None):
  """A compiled Distiller whose `evaluate` scores `model`, which outputs probabilities.

  For ensembles (mean of the members' softmax): log p is a valid logit vector
  (softmax(log p) = p), so the test step's cross-entropy, accuracy (and perplexity)
  are those of the probabilities, weighted and summed over replicas as for a member.
  Build it in the strategy scope the model was built in. `stateful`: the model's
  stateful form ([x, state] -> [probabilities, state]); evaluation then carries the
  state over streams (CarriedState.score).
  """
  inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
  log_probs = keras.layers.Activation(_safe_log, dtype="float32", name="log_probs")(model(inputs))
  state = None
  if stateful is not None:
    s_in = [keras.Input(shape=t.shape[1:], dtype=t.dtype) for t in stateful.inputs]
    probs, s_out = stateful(s_in)
    log_stateful = keras.Model(
      s_in, [keras.layers.Activation(_safe_log, dtype="float32")(probs), s_out]
    )
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    state = CarriedState(log_stateful, s_in[1].shape[-1], replicas, 1)
  scorer = Distiller(
    keras.Model(inputs, log_probs, name=f"{model.name}_log_probs"),
    perplexity=perplexity,
    state=state,
  )
  scorer.compile()
  return scorer


_safe_log = teacher_lib.log_probabilities


def moving_statistics(model):
  """The BatchNorm moving means and variances of `model` and its nested layers."""
  out, seen, todo = [], set(), [model]
  while todo:
    layer = todo.pop(0)
    if id(layer) in seen:
      continue
    seen.add(id(layer))
    if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
      out += [layer.moving_mean, layer.moving_variance]
    todo += list(getattr(layer, "layers", []))
  return out


def _tokens(logits):
  """Logits [..., V] as rows [N, V]: [B, C] unchanged, [B, T, V] -> [B*T, V] (any rank alike)."""
  return tf.reshape(logits, [-1, logits.shape[-1] or tf.shape(logits)[-1]])


def _clip_global_norm(grads, clip_norm):
  """Clips the all-replica gradient sum to `clip_norm`; returns per-replica shares."""
  n = _num_replicas()
  grads = [tf.convert_to_tensor(g) for g in grads]  # dense: embedding grads are IndexedSlices
  if n > 1:  # one flat all-reduce: the same single collective on every replica
    flat = _global_sum(tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0))
    sizes = [int(np.prod(g.shape)) for g in grads]
    grads = [tf.reshape(f, g.shape) for f, g in zip(tf.split(flat, sizes), grads)]
  grads, _ = tf.clip_by_global_norm(grads, clip_norm)
  # The optimizer sums the replicas' gradients again: each contributes 1/n.
  return [g / n for g in grads] if n > 1 else grads


def evaluate_splits(model, dataset, batch_size, val_logs=None):
  """{split}_loss and {split}_accuracy of a Distiller on val (when the data set has
  one) and test: the final-epoch numbers (no selection on test, nor on val).

  `val_logs`: the Keras logs of the final epoch (`val_label_loss`, `val_accuracy`),
  when fit validated the very weights being evaluated: they are this same
  Distiller.evaluate of the same val pipeline, so they are used as they are
  instead of repeating the pass (the figures are identical; tests/tasks_contract_test.py
  and tests/multireplica_test.py check them against the exported SavedModel).
  """
  out = {}
  for split in ("val", "test"):
    if split == "val" and val_logs and "val_label_loss" in val_logs and "val_accuracy" in val_logs:
      out["val_loss"], out["val_accuracy"] = (
        float(val_logs["val_label_loss"]),
        float(val_logs["val_accuracy"]),
      )
      continue
    ds = getattr(dataset, split)(batch_size)
    if ds is None:
      continue
    res = model.evaluate(ds, verbose=0, return_dict=True)
    out[f"{split}_loss"] = float(res["label_loss"])
    out[f"{split}_accuracy"] = float(res["accuracy"])
  out["test_error"] = 1.0 - out["test_accuracy"]
  return out
