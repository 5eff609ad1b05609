"""One generation: build a fresh student, fit it (to its teacher), evaluate, export.

A `GenerationSpec` says which generation to train (role, architecture, seed, the
resolved objective, the teacher's SavedModel, where to write and resume from);
`run_generation` trains it in small steps (build, restore, fit, evaluate,
finish). What differs between tasks (model, optimizer, schedule callbacks,
derived metrics, assets) is asked of the task object (tasks/).

`run_generation` is resumable: at the end of every epoch the student, the
optimizer (momentum slots and step counter, hence the learning-rate schedule) and
the epoch are checkpointed, and the data pipeline is a function of (seed, epoch),
so a generation interrupted at epoch e continues from e as if never stopped.
"""

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Optional, Union

import keras
import tensorflow as tf
from absl import logging

from ban_tf import console
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import faults
from ban_tf import layout
from ban_tf import losses
from ban_tf import manifest
from ban_tf import models
from ban_tf import results as results_lib
from ban_tf import rundir
from ban_tf import tasks
from ban_tf.schedules import StepDecay  # pylint: disable=unused-import  (custom object of old checkpoints)


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
  """One generation to train.

  Attributes:
    gen: 0 (the teacher), k (BAN-k), or "baseline" (BAN-1's architecture and seed
      on labels only, no teacher, nothing shared).
    role: "teacher", "BAN-k" or "baseline" (logs and metrics.json).
    arch: resolved architecture name.
    seed: cfg.seed_for(gen): seed + k, or --student_seed + k - 1 for students (the
      baseline: BAN-1's seed).
    objective: the resolved losses.Objective (labels only for the teacher and baseline).
    teacher_path: the previous generation's SavedModel, or None.
    out_dir: where this generation writes (gen_k/, baseline/; `store` is its handle).
    read_dir: where it resumes from: out_dir, except on a multi-worker non-chief,
      which writes privately and resumes from the chief's directory.
    dropout: cfg.dropout_for(gen): --teacher_dropout for generation 0 when given.
  """

  gen: Union[int, str]
  role: str
  arch: str
  seed: int
  objective: losses.Objective
  teacher_path: Optional[str]
  out_dir: str
  read_dir: str
  dropout: float = 0.0

  @classmethod
  def generation(cls, cfg, gen, out_dir, teacher_path=None, read_dir=None):
    objective = cfg.objective() if gen > 0 else losses.Objective.labels_only()
    return cls(
      gen=gen,
      role="teacher" if gen == 0 else f"BAN-{gen}",
      arch=cfg.arch_for(gen),
      seed=cfg.seed_for(gen),
      objective=objective,
      teacher_path=teacher_path if gen > 0 else None,
      out_dir=out_dir,
      read_dir=read_dir or out_dir,
      dropout=cfg.dropout_for(gen),
    )

  @classmethod
  def baseline(cls, cfg, out_dir, read_dir=None):
    return cls(
      gen="baseline",
      role="baseline",
      arch=cfg.arch_for(1),
      seed=cfg.seed_for("baseline"),
      objective=losses.Objective.labels_only(),
      teacher_path=None,
      out_dir=out_dir,
      read_dir=read_dir or out_dir,
      dropout=cfg.dropout_for(1),
    )

  @property
  def store(self) -> rundir.ModelDir:
    """The generation's directory handle (rundir.py): its files, checkpoints and seal."""
    return rundir.ModelDir.at(
      self.out_dir, self.read_dir, row=results_lib.generation_name(self.gen)
    )

  @property
  def index(self) -> int:
    """The generation number the logs and fault hooks use (the baseline counts as 1)."""
    return 1 if self.gen == "baseline" else self.gen


def make_optimizer(cfg, steps_per_epoch):
  """The task's optimizer (and schedule) for `steps_per_epoch` steps per epoch."""
  return tasks.get(cfg.task).make_optimizer(cfg, steps_per_epoch)


def execution_steps(requested, steps_per_epoch):
  """Train steps per compiled call: the largest divisor of `steps_per_epoch` <= `requested`.

  Keras runs whole calls of `steps_per_execution` steps and counts an epoch in calls,
  so a value that does not divide the epoch moves every epoch boundary (3 with 8 steps
  per epoch: epochs ended after steps 9, 18, 24), and with it validation, checkpoints,
  history and the schedules. A divisor keeps them where one step per call puts them,
  so the flag changes nothing trained.
  """
  requested, steps_per_epoch = int(requested), int(steps_per_epoch)
  return max(
    d for d in range(1, max(min(requested, steps_per_epoch), 1) + 1) if steps_per_epoch % d == 0
  )


def make_checkpoint(student, optimizer, epoch_var, projection=None):
  """What an epoch checkpoint holds: everything that resuming must restore.

  Through `optimizer`: the student's trainable weights, the momentum slots and the
  step counter (which drives the learning-rate schedule and DKPP's seeds). Pass the
  compiled model's optimizer: under --mixed_precision=fp16 that is Keras'
  LossScaleOptimizer, whose dynamic loss scale (and its growth counter) must be
  restored too, or a resumed run rescales from 2^15 (tests/reliability_test.py). Through
  `student`: BatchNorm statistics. `variables` adds what that tracking misses: the
  dropout layers' SeedGenerator states, so resumed dropout masks are the ones an
  uninterrupted run would draw (tests/resume_test.py). `projection`: the
  activation-matching projection layer, when there is one.
  """
  tracked = {"projection": projection} if projection is not None else {}
  return tf.train.Checkpoint(
    student=student,
    variables=list(student.variables),
    optimizer=optimizer,
    epoch=epoch_var,
    **tracked,
  )


class EpochState(keras.callbacks.Callback):
  """Per epoch: NaN guard, checkpoint, history.json, TensorBoard scalars and the console line.

  The learning rate recorded for an epoch is the one its steps used: read when the
  epoch begins (after the task's callbacks set it), not when it ends (by then a
  step schedule may already give the next epoch's rate).

  Args:
    store: the generation's rundir.ModelDir (history.json, checkpoints).
    manager: its tf.train.CheckpointManager; epoch_var: the checkpointed epoch.
    history: the live list of per-epoch entries (resumed ones first).
    writer: the generation's TensorBoard summary writer.
    optimizer: the student's optimizer (its learning rate is logged).
    quiet_tags: Keras log keys not written to TensorBoard: terms whose weight is
      0 in this generation's objective, which would only draw all-zero lines.
    gen: the train.GenerationSpec (for console lines); epochs: epochs per generation.
  """

  def __init__(
    self, store, manager, epoch_var, history, writer, optimizer, quiet_tags=(), gen=None, epochs=0
  ):
    super().__init__()
    self.store, self.manager, self.epoch_var = store, manager, epoch_var
    self.history, self.writer, self.optimizer = history, writer, optimizer
    self.quiet_tags, self.gen, self.epochs = frozenset(quiet_tags), gen, epochs
    self.diverged = None
    self.console_line = None  # printed by ConsoleLine
    self._t0 = None
    self._epoch = 0
    self._lr = None

  def _where(self, epoch):
    return f"{self.store.name}/epoch_{epoch + 1}"

  def _current_lr(self):
    return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))

  def on_epoch_begin(self, epoch, logs=None):
    self._t0 = time.time()
    self._epoch = epoch
    self._lr = self._current_lr()  # the rate of this epoch's steps (schedules: at its first step)
    if console.progress() and self.gen is not None:
      console.progress().epoch_begin(self.gen, epoch)

  def on_train_batch_end(self, batch, logs=None):
    loss = (logs or {}).get("loss")
    if faults.nan_if(self._where(self._epoch)):
      loss = float("nan")
    if loss is not None and not math.isfinite(float(loss)):
      self.diverged = float(loss)
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    if self.diverged is not None:
      return  # keep the last good checkpoint
    logs = {k: float(v) for k, v in (logs or {}).items()}
    lr = self._lr if self._lr is not None else self._current_lr()
    entry = dict(logs, epoch=epoch + 1, learning_rate=lr, seconds=time.time() - self._t0)
    with self.writer.as_default(step=epoch + 1):
      for k, v in logs.items():
        if k in self.quiet_tags:
          continue
        name = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
        tf.summary.scalar(name, v)
      tf.summary.scalar("train/learning_rate", lr)
    self.writer.flush()
    # history.json first: on resume it is cut back to the checkpoint's epoch, so it
    # always covers every checkpointed epoch whenever the process dies (TensorBoard
    # too: rundir.truncate_tensorboard).
    self.history[:] = [h for h in self.history if h["epoch"] <= epoch] + [entry]
    self.store.write_history(self.history)
    faults.disk_fault_if(self._where(epoch), self.store.path)
    self.epoch_var.assign(epoch + 1)
    # CheckpointManager updates its `checkpoint` index only after the new files are
    # complete, and deletes old ones only then: a failed save keeps the last good one.
    self.manager.save(checkpoint_number=epoch + 1)
    faults.kill_if("kill_after_checkpoint", self._where(epoch))
    if console.progress() and self.gen is not None:
      self.console_line = console.progress().epoch_line(self.gen, epoch, self.epochs, logs, lr)


class ConsoleLine(keras.callbacks.Callback):
  """Prints EpochState's run-level line; placed after Keras' ProgbarLogger, so on a
  terminal the line follows the finished progress bar instead of landing inside it."""

  def __init__(self, state):
    super().__init__()
    self.state = state

  def on_epoch_end(self, epoch, logs=None):
    line, self.state.console_line = self.state.console_line, None
    if line and console.progress():
      console.progress().print(line)
    faults.signal_if(self.state._where(epoch))  # pylint: disable=protected-access


def quiet_tags(objective, has_teacher):
  """Keras log keys of the loss terms this objective leaves out (weight 0): not plotted."""
  out = set()
  if not has_teacher or objective.kd_weight == 0:
    out.add("kd_loss")
  if objective.label_weight == 0:
    out.add("label_loss")
  if not has_teacher or objective.feature_weight == 0:
    out.add("feature_loss")
  return out


def _verbose(cfg):
  """Keras' verbosity: the progress bar on a terminal; elsewhere the console line per epoch says it all."""
  if cfg.verbose != "auto":
    return int(cfg.verbose)
  return 1 if sys.stdout.isatty() else 0


def _share_stem_head(student, teacher_path):
  path = layout.beside(teacher_path, layout.KERAS)  # gen_{k-1}/model.keras beside its saved_model
  if not os.path.exists(path):
    raise errors.TeacherError(
      f"--share_stem_head needs the teacher's {path}: retrain that generation "
      "or drop --share_stem_head"
    )
  try:
    teacher = keras.saving.load_model(path, custom_objects={"StepDecay": StepDecay}, compile=False)
  except Exception as e:  # pylint: disable=broad-except  (truncated zip, bad config: many kinds)
    raise errors.TeacherError(
      f"--share_stem_head: the teacher's {path} cannot be loaded ({type(e).__name__}): restore it, or delete "
      "that generation's directory to retrain it, or --overwrite"
    ) from None
  try:
    models.copy_and_freeze(student, teacher)
  except ValueError as e:
    raise errors.TeacherError(
      f"--share_stem_head: {e}: use a student whose stem width and feature width equal the "
      "teacher's (e.g. wrn-match-U), or drop --share_stem_head"
    ) from None


@dataclasses.dataclass
class _Built:
  student: keras.Model
  model: distiller_lib.Distiller
  optimizer: keras.optimizers.Optimizer
  epoch_var: tf.Variable
  ckpt: tf.train.Checkpoint


def _build(cfg, task, gen, strategy, dataset, steps):
  """Teacher (from disk, teacher.Teacher), fresh student, Distiller, optimizer and checkpoint."""
  spec = task.spec(dataset)
  obj = gen.objective
  teacher = None
  carry = task.carry(cfg)  # what the models do with their state between batches
  if gen.teacher_path:  # outside the scope: Teacher.load runs the SavedModel eagerly to verify it
    teacher = carry.load_teacher(
      gen.teacher_path,
      strategy,
      expected_classes=spec.num_outputs,
      with_features=obj.feature_weight > 0,
    )
  with strategy.scope():
    name = f"gen{gen.index}_" + gen.arch.replace("-", "_").replace(":", "_")
    student = task.build_model(
      gen.arch, dataset, dropout=gen.dropout, name=name, init_weights=cfg.init_weights
    )
    if cfg.sync_batchnorm:  # any BatchNormalization layers (none in the language models)
      models.synchronize_batchnorm(student)
    projection = None
    if teacher is not None:
      if obj.feature_weight > 0:
        s_dim = student.get_layer("features").output.shape[-1]
        if obj.feature_projection:
          projection = teacher.feature_dim
        elif s_dim != teacher.feature_dim:
          raise errors.TeacherError(
            f"--feature_weight: student features have {s_dim} dims but the teacher's have "
            f"{teacher.feature_dim}: add --feature_projection or use a same-width student"
          )
      if obj.share_stem_head:
        _share_stem_head(student, gen.teacher_path)
    try:  # the task's stateful view of the student and the teacher's own state, or None
      state = carry.training_state(student, cfg.batch_size, steps, teacher)
    except ValueError as e:
      raise errors.UsageError(
        f"--batch_size={cfg.batch_size}: {e}: use a multiple of the replica count"
      ) from None
    model = distiller_lib.Distiller(
      student,
      teacher,
      loss=obj.loss,
      temperature=obj.temperature,
      kd_weight=obj.kd_weight,
      label_weight=obj.label_weight,
      weight_decay=cfg.weight_decay,
      seed=gen.seed,
      feature_weight=obj.feature_weight if teacher is not None else 0.0,
      feature_projection=projection,
      clip_norm=cfg.clip_norm,
      augment=task.train_augmenter(cfg, dataset, gen.seed),
      perplexity=task.perplexity,
      state=state,
    )
    optimizer = task.make_optimizer(cfg, steps)
    per_call = execution_steps(cfg.steps_per_execution, steps)
    if per_call != cfg.steps_per_execution:
      logging.info(
        "--steps_per_execution=%d does not divide the %d steps of an epoch: %d steps per call, "
        "so that epochs end where they would with 1",
        cfg.steps_per_execution,
        steps,
        per_call,
      )
    model.compile(optimizer=optimizer, steps_per_execution=per_call, jit_compile=cfg.jit_compile)
    # model.optimizer: `optimizer` itself, or (fp16) Keras' LossScaleOptimizer around it.
    model.optimizer.build(model.train_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = make_checkpoint(student, model.optimizer, epoch_var, projection=model.projection)
  return _Built(student, model, optimizer, epoch_var, ckpt)


def _restore(gen, built):
  """(first epoch to train, history so far) from the newest readable checkpoint in gen.read_dir
  (rundir.ModelDir.restore: fallback and repair; .history: cut back to it)."""
  latest = gen.store.restore(built.ckpt, label=f"gen {gen.gen}")
  if latest is None:
    return 0, []
  initial_epoch = int(built.epoch_var.numpy())
  history = gen.store.history(initial_epoch)
  logging.info("gen %s: resuming from epoch %d (%s)", gen.gen, initial_epoch, latest)
  return initial_epoch, history


def _diverged(gen, state, epoch_var):
  good = int(epoch_var.numpy())
  kept = (
    f"its last good checkpoint (epoch {good}) is kept in {gen.out_dir}/{layout.CKPT}"
    if good
    else "it has no good checkpoint yet"
  )
  return errors.DivergedError(
    f"generation {gen.index} diverged (loss={state.diverged}) in epoch {good + 1}: {kept}; "
    "rerun the same command to retry from it, or start over with a lower --lr "
    "(--lr changes the experiment: add --overwrite or use a new --run_dir)"
  )


def run_generation(cfg, gen, strategy, dataset):
  """Trains the generation `gen` (a GenerationSpec) into gen.out_dir; returns its metrics dict."""
  task = tasks.get(cfg.task)
  spec = task.spec(dataset)
  store = gen.store
  store.make()
  keras.utils.set_random_seed(gen.seed)  # fresh, differently seeded student per generation
  steps = dataset.steps_per_epoch(cfg.batch_size)
  built = _build(cfg, task, gen, strategy, dataset, steps)
  initial_epoch, history = _restore(gen, built)  # before the manager reads the (repaired) index
  manager = store.checkpoint_manager(built.ckpt)
  # Built once, from the first epoch still to train (per-epoch shuffles: see data.py).
  train_ds = task.train_data(cfg, dataset, seed=gen.seed, first_epoch=initial_epoch)
  store.truncate_tensorboard(initial_epoch)  # each (tag, step) once after a resume
  writer = store.summary_writer()
  state = EpochState(
    store,
    manager,
    built.epoch_var,
    history,
    writer,
    built.optimizer,
    quiet_tags=quiet_tags(gen.objective, gen.teacher_path is not None),
    gen=gen,
    epochs=cfg.epochs,
  )
  # The task's callbacks first: they may add to an epoch's logs before state records them;
  # Keras' progress bar (when shown) before the console line.
  verbose = _verbose(cfg)
  callbacks = (
    task.callbacks(cfg, history, built.optimizer)
    + [state]
    + ([keras.callbacks.ProgbarLogger()] if verbose else [])
    + [ConsoleLine(state)]
  )
  logging.info(
    "gen %s (%s): %s, %d params, objective %s, seed %d, teacher %s",
    gen.gen,
    gen.role,
    gen.arch,
    built.student.count_params(),
    gen.objective.to_dict(),
    gen.seed,
    gen.teacher_path,
  )
  if console.progress():
    console.progress().generation(
      gen, _header(gen, built.student.count_params()), initial_epoch, cfg.epochs
    )
  t0 = time.time()
  if initial_epoch < cfg.epochs:
    built.model.fit(
      train_ds,
      epochs=cfg.epochs,
      initial_epoch=initial_epoch,
      steps_per_epoch=steps,
      validation_data=dataset.val(cfg.batch_size),
      callbacks=callbacks,
      verbose=verbose,
      shuffle=False,
    )  # the pipeline shuffles, per (seed, epoch)
  if state.diverged is not None:
    raise _diverged(gen, state, built.epoch_var)
  result = {
    "gen": gen.gen,
    "role": gen.role,
    "arch": gen.arch,
    "params": int(built.student.count_params()),
    "seed": gen.seed,
    "objective": gen.objective.to_dict(),
    "teacher": gen.teacher_path,
    "epochs": cfg.epochs,
    "seconds": sum(h["seconds"] for h in state.history) or time.time() - t0,
    "weights_sha256": manifest.weights_digest(built.student),
  }
  # The final epoch's validation (this process's fit, or history.json when resumed
  # after it) ran on exactly these weights: nothing changes them after that epoch's
  # checkpoint. Reused, not measured twice.
  last = state.history[-1] if state.history and state.history[-1]["epoch"] == cfg.epochs else None
  result.update(distiller_lib.evaluate_splits(built.model, dataset, cfg.batch_size, val_logs=last))
  if state.history:
    result["final_train"] = {k: v for k, v in state.history[-1].items() if not k.startswith("val_")}
  store.seal(
    task,
    spec,
    result,
    model=built.student,
    keras_model=built.student,
    summary_step=cfg.epochs,
    record={"weights_sha256": result["weights_sha256"]},
    outputs=functools.partial(task.store_predictions, cfg, dataset),
  )
  logging.info(
    "gen %s (%s) done: test accuracy %.4f, %s %.4f, weights sha256 %s",
    gen.gen,
    gen.role,
    result["test_accuracy"],
    task.headline.key,
    result[task.headline.key],
    result["weights_sha256"],
  )
  if console.progress():
    console.progress().print(
      f"{console.progress().prefix}{console.progress().gen_label(gen)} done: "
      f"{headline_text(task, result)}"
    )
  return result


def _header(gen, params):
  """The console header of a generation: arch, params, objective, teacher."""
  o = gen.objective
  if gen.teacher_path is None:
    objective = "labels only"
  else:
    terms = [f"{o.loss} (T={o.temperature:g}, KD weight {o.kd_weight:g})"]
    if o.label_weight:
      terms.append(f"label weight {o.label_weight:g}")
    if o.feature_weight:
      terms.append(f"feature weight {o.feature_weight:g}")
    objective = ", ".join(terms)
  teacher = (
    "no teacher"
    if gen.teacher_path is None
    else f"teacher {os.path.basename(os.path.dirname(os.path.abspath(gen.teacher_path)))}"
  )
  return f"{gen.arch} ({results_lib.format_params(params)} params), {objective}, {teacher}, seed {gen.seed}"


def headline_text(task, result):
  """'test error 61.74%' (the task's headline metric, and its validation twin when there is one)."""
  parts = []
  for m in (task.headline,) + tuple(task.extra_columns):
    v = m.value(result)
    if v is not None:
      parts.append(f"{m.text or m.title} {v:.2f}{'%' if m.percent else ''}")
  return ", ".join(parts)


def train_generation(cfg, gen, strategy, dataset, gen_dir, teacher_path=None, read_dir=None):
  """Trains generation `gen` (0 = teacher) into `gen_dir`: run_generation of its spec."""
  return run_generation(
    cfg, GenerationSpec.generation(cfg, gen, gen_dir, teacher_path, read_dir), strategy, dataset
  )
