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
import glob
import hashlib
import math
import os
import re
import shutil
import sys
import time
from typing import Optional, Union

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ban_tf import console
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import faults
from ban_tf import losses
from ban_tf import manifest
from ban_tf import models
from ban_tf import results as results_lib
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
    out_dir: where this generation writes (gen_k/, baseline/).
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
  def index(self) -> int:
    """The generation number the logs and fault hooks use (the baseline counts as 1)."""
    return 1 if self.gen == "baseline" else self.gen


def weights_digest(model):
  """sha256 of every weight (trainable and BatchNorm statistics), in layer order."""
  h = hashlib.sha256()
  for w in model.get_weights():
    h.update(np.ascontiguousarray(w).tobytes())
  return h.hexdigest()


def make_optimizer(cfg, steps_per_epoch):
  """The task's optimizer (and schedule) for `steps_per_epoch` steps per epoch."""
  return tasks.get(cfg.task).make_optimizer(cfg, steps_per_epoch)


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
    gen_dir: the generation's directory (history.json, checkpoints).
    manager: its tf.train.CheckpointManager; epoch_var: the checkpointed epoch.
    history: the live list of per-epoch entries (resumed ones first).
    writer: the generation's TensorBoard summary writer.
    optimizer: the student's optimizer (its learning rate is logged).
    quiet_tags: Keras log keys not written to TensorBoard: terms whose weight is
      0 in this generation's objective, which would only draw all-zero lines.
    gen: the train.GenerationSpec (for console lines); epochs: epochs per generation.
  """

  def __init__(
    self, gen_dir, manager, epoch_var, history, writer, optimizer, quiet_tags=(), gen=None, epochs=0
  ):
    super().__init__()
    self.gen_dir, self.manager, self.epoch_var = gen_dir, manager, epoch_var
    self.history, self.writer, self.optimizer = history, writer, optimizer
    self.quiet_tags, self.gen, self.epochs = frozenset(quiet_tags), gen, epochs
    self.diverged = None
    self.console_line = None  # printed by ConsoleLine
    self._t0 = None
    self._epoch = 0
    self._lr = None

  def _where(self, epoch):
    return f"{os.path.basename(self.gen_dir)}/epoch_{epoch + 1}"

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
    # too: tensorboard_from_checkpoint).
    self.history[:] = [h for h in self.history if h["epoch"] <= epoch] + [entry]
    export.write_json(self.history, os.path.join(self.gen_dir, "history.json"))
    faults.disk_fault_if(self._where(epoch), self.gen_dir)
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


def tensorboard_from_checkpoint(logdir, last_epoch):
  """Cuts a generation's TensorBoard events back to the checkpointed epochs (step <= last_epoch).

  Epoch e's scalars are written before its checkpoint; a run stopped in between
  (disk full, a kill) would write them again when it resumes, leaving two points
  per (tag, step); likewise test/*, written after the last epoch but before the
  generation is DONE. TensorBoard only purges such orphans for TF1's session-log
  events, so the events files are rewritten here (atomically, one file) keeping
  every record whose step is <= last_epoch, test/* left out. Hparams files
  (report.py) are left alone.
  """
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top

  files = sorted(
    f
    for f in tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))
    if not f.endswith(".hparams")
  )
  if not files:
    return
  kept, dropped = [], 0
  for path in files:
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      # test/* is written once, after the last epoch (finish): a rerun that gets there writes it again.
      if event.HasField("summary") and (
        event.step > last_epoch or any(v.tag.startswith("test/") for v in event.summary.value)
      ):
        dropped += 1
      else:
        kept.append(record.numpy())
  if not dropped:
    return
  out = os.path.join(logdir, os.path.basename(files[-1]) + ".resumed")
  tmp = out + ".tmp"
  with tf.io.TFRecordWriter(tmp) as w:
    for record in kept:
      w.write(record)
  for path in files:
    os.remove(path)
  os.replace(tmp, out)
  logging.info(
    "%s: dropped %d TensorBoard points after epoch %d (written before a checkpoint that "
    "was never saved)",
    logdir,
    dropped,
    last_epoch,
  )


def _verbose(cfg):
  """Keras' verbosity: the progress bar on a terminal; elsewhere the console line per epoch says it all."""
  if cfg.verbose != "auto":
    return int(cfg.verbose)
  return 1 if sys.stdout.isatty() else 0


def _teacher_keras_path(teacher_path):
  """gen_{k-1}/model.keras next to gen_{k-1}/saved_model (for --share_stem_head)."""
  return os.path.join(os.path.dirname(os.path.abspath(teacher_path)), "model.keras")


def _share_stem_head(student, teacher_path):
  path = _teacher_keras_path(teacher_path)
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
  """Teacher (from disk), fresh student, Distiller, optimizer and checkpoint."""
  spec = task.spec(dataset)
  obj = gen.objective
  teacher = None
  if gen.teacher_path:  # outside the scope: load_teacher runs the SavedModel eagerly to verify it
    teacher = export.load_teacher(
      gen.teacher_path,
      strategy,
      expected_classes=spec.num_outputs,
      with_features=obj.feature_weight > 0,
      stateful=task.carries_state(cfg),
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
    state = None
    if task.carries_state(cfg):  # the task's stateful view of the student; the teacher's endpoint
      stateful = task.stateful_model(student)
      try:
        state = distiller_lib.CarriedState(
          stateful,
          stateful.inputs[1].shape[-1],
          cfg.batch_size,
          steps,
          teacher=teacher.call_endpoint_fn if teacher is not None else None,
          teacher_state_size=teacher.state_size if teacher is not None else 0,
        )
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
    model.compile(
      optimizer=optimizer, steps_per_execution=cfg.steps_per_execution, jit_compile=cfg.jit_compile
    )
    # model.optimizer: `optimizer` itself, or (fp16) Keras' LossScaleOptimizer around it.
    model.optimizer.build(model.train_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = make_checkpoint(student, model.optimizer, epoch_var, projection=model.projection)
  return _Built(student, model, optimizer, epoch_var, ckpt)


def _ckpt_number(prefix):
  m = re.search(r"-(\d+)$", prefix)
  return int(m.group(1)) if m else -1


def _checkpoints(ckpt_dir):
  """(checkpoint prefixes in `ckpt_dir`, newest first; whether its index is damaged).

  The prefixes: those the `checkpoint` index names (even when their files are gone)
  and every ckpt-N.index file (even when the index is damaged or lost track of it).
  """
  found, damaged = set(), False
  try:
    state = tf.train.get_checkpoint_state(ckpt_dir)
    why = "unparsable" if state is None else ""
  except Exception as e:  # pylint: disable=broad-except  (a damaged index: text-proto parse errors)
    state, why = None, type(e).__name__
  if state is None and os.path.exists(os.path.join(ckpt_dir, "checkpoint")):
    logging.warning(
      "%s/checkpoint is damaged (%s): using the checkpoint files it should list",
      os.path.join(os.path.basename(os.path.dirname(ckpt_dir)), "ckpt"),
      why,
    )
    damaged = True
  if state is not None:
    for p in list(state.all_model_checkpoint_paths) + [state.model_checkpoint_path]:
      if p:
        found.add(os.path.join(ckpt_dir, os.path.basename(p)))
  for index in glob.glob(os.path.join(ckpt_dir, "ckpt-*.index")):
    found.add(index[: -len(".index")])
  return sorted(found, key=_ckpt_number, reverse=True), damaged


def _restore(gen, built):
  """(first epoch to train, history so far) from the newest readable checkpoint in gen.read_dir.

  A newest checkpoint that is missing (its index entry dangling) or unreadable
  (truncated, emptied) is skipped with a warning and the previous one is used;
  where this process owns the directory, the damaged files are removed and the
  index is rewritten to the checkpoint used, so the next save and every later
  rerun see a consistent directory. Raises errors.RunDirError when checkpoints
  exist but none is readable, or when history.json is damaged.
  """
  ckpt_dir = os.path.join(gen.read_dir, "ckpt")
  candidates, bad_index = _checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else ([], False)
  if not candidates:
    return 0, []
  where = os.path.basename(gen.read_dir)
  latest, skipped = None, []
  for prefix in candidates:
    name = f"{where}/ckpt/{os.path.basename(prefix)}"
    if not os.path.exists(prefix + ".index"):
      skipped.append((prefix, f"{name} is missing (its index entry is dangling)"))
      continue
    try:
      built.ckpt.restore(prefix).assert_existing_objects_matched()
    except Exception as e:  # pylint: disable=broad-except  (DataLossError, NotFoundError, AssertionError, ...)
      skipped.append((prefix, f"{name} is unreadable ({type(e).__name__})"))
      continue
    latest = prefix
    break
  fix = (
    f"delete {gen.read_dir}/ckpt and {gen.read_dir}/history.json to retrain this generation from "
    "epoch 0, or --overwrite"
  )
  if latest is None:
    raise errors.RunDirError(
      f"{ckpt_dir} holds no readable checkpoint ("
      + "; ".join(why for _, why in skipped)
      + f"): {fix}"
    )
  for _prefix, why in skipped:
    logging.warning(
      "gen %s: %s: resuming from the previous checkpoint, %s",
      gen.gen,
      why,
      os.path.basename(latest),
    )
  if (skipped or bad_index) and gen.read_dir == gen.out_dir:
    # Repair: drop the damaged files, point the index at `latest`.
    for prefix, _ in skipped:
      for path in glob.glob(prefix + ".index") + glob.glob(prefix + ".data-*"):
        os.remove(path)
    kept = [p for p in candidates if p not in {q for q, _ in skipped}]
    tf.compat.v1.train.update_checkpoint_state(
      ckpt_dir,
      os.path.basename(latest),
      all_model_checkpoint_paths=[os.path.basename(p) for p in reversed(kept)],
    )
  initial_epoch = int(built.epoch_var.numpy())
  history = []
  hist_path = os.path.join(gen.read_dir, "history.json")
  if os.path.exists(hist_path):
    entries = export.read_json_checked(hist_path, f"restore it, or {fix}", expect=list)
    if not all(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in entries):
      raise errors.RunDirError(
        f"{hist_path} is damaged (entries without an epoch): restore it, or {fix}"
      )
    history = [h for h in entries if h["epoch"] <= initial_epoch]
  logging.info("gen %s: resuming from epoch %d (%s)", gen.gen, initial_epoch, latest)
  return initial_epoch, history


def _diverged(gen, state, epoch_var):
  good = int(epoch_var.numpy())
  kept = (
    f"its last good checkpoint (epoch {good}) is kept in {gen.out_dir}/ckpt"
    if good
    else "it has no good checkpoint yet"
  )
  return errors.DivergedError(
    f"generation {gen.index} diverged (loss={state.diverged}) in epoch {good + 1}: {kept}; "
    "rerun the same command to retry from it, or start over with a lower --lr "
    "(--lr changes the experiment: add --overwrite or use a new --run_dir)"
  )


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


def finish(
  task, spec, model, out_dir, result, writer=None, step=0, output_name=export.LOGITS, stateful=None
):
  """Adds the task's derived metrics, logs test scalars, exports, writes metrics.json and DONE.

  Shared by generations and BANE ensembles. `model` is what the SavedModel serves
  (`output_name`: export.LOGITS, or export.PROBABILITIES for ensembles); `stateful`
  its stateful form (default: the task's, if any), served as `serve_stateful`.
  """
  if stateful is None:
    stateful = task.stateful_model(model)
  derived = task.summarize(result)
  result.update(derived)
  if writer is not None:
    with writer.as_default(step=step):
      tf.summary.scalar("test/accuracy", result["test_accuracy"])
      tf.summary.scalar("test/error", result["test_error"])
      for key in derived:
        split, name = key.split("_", 1)
        tf.summary.scalar(f"{split}/final_{name}", result[key])
    writer.flush()
  export.export_saved_model(
    model,
    os.path.join(out_dir, "saved_model"),
    spec.input_shape,
    class_names=spec.class_names,
    output_name=output_name,
    spec=spec,
    stateful=stateful,
  )
  for name, text in spec.assets:
    export.write_text(text, os.path.join(out_dir, name))


def run_generation(cfg, gen, strategy, dataset):
  """Trains the generation `gen` (a GenerationSpec) into gen.out_dir; returns its metrics dict."""
  task = tasks.get(cfg.task)
  spec = task.spec(dataset)
  os.makedirs(gen.out_dir, exist_ok=True)
  keras.utils.set_random_seed(gen.seed)  # fresh, differently seeded student per generation
  steps = dataset.steps_per_epoch(cfg.batch_size)
  built = _build(cfg, task, gen, strategy, dataset, steps)
  initial_epoch, history = _restore(gen, built)  # before the manager reads the (repaired) index
  manager = tf.train.CheckpointManager(built.ckpt, os.path.join(gen.out_dir, "ckpt"), max_to_keep=2)
  # Built once, from the first epoch still to train (per-epoch shuffles: see data.py).
  train_ds = task.train_data(cfg, dataset, seed=gen.seed, first_epoch=initial_epoch)
  tb_dir = results_lib.tensorboard_dir(
    os.path.dirname(gen.out_dir), results_lib.generation_name(gen.gen)
  )
  tensorboard_from_checkpoint(tb_dir, initial_epoch)  # each (tag, step) once after a resume
  writer = tf.summary.create_file_writer(tb_dir)
  state = EpochState(
    gen.out_dir,
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
    "weights_sha256": weights_digest(built.student),
  }
  # The final epoch's validation (this process's fit, or history.json when resumed
  # after it) ran on exactly these weights: nothing changes them after that epoch's
  # checkpoint. Reused, not measured twice.
  last = state.history[-1] if state.history and state.history[-1]["epoch"] == cfg.epochs else None
  result.update(evaluate_splits(built.model, dataset, cfg.batch_size, val_logs=last))
  if state.history:
    result["final_train"] = {k: v for k, v in state.history[-1].items() if not k.startswith("val_")}
  finish(task, spec, built.student, gen.out_dir, result, writer, cfg.epochs)
  export.save_keras(task.stock_model(built.student), os.path.join(gen.out_dir, "model.keras"))
  export.write_json(result, os.path.join(gen.out_dir, "metrics.json"))
  # Bound to the run outside the generation directory, before DONE (manifest.py).
  run_dir, name = os.path.split(os.path.abspath(gen.out_dir))
  manifest.record(
    run_dir, name, weights_sha256=result["weights_sha256"], **manifest.digests(gen.out_dir)
  )
  export.touch_done(gen.out_dir)
  shutil.rmtree(os.path.join(gen.out_dir, "ckpt"), ignore_errors=True)
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
