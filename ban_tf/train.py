"""One generation: build a fresh student, fit it (to its teacher), evaluate, export.

`train_generation` is resumable: at the end of every epoch the student, the
optimizer (momentum slots and step counter, hence the learning-rate schedule) and
the epoch are checkpointed, and the data pipeline is a function of (seed, epoch),
so a generation interrupted at epoch e continues from e as if never stopped.
"""

import hashlib
import math
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import faults
from ban_tf import lm
from ban_tf import lm_models
from ban_tf import models


@keras.saving.register_keras_serializable(package="ban_tf")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
  """lr * decay^(number of boundaries passed); boundaries in optimizer steps."""

  def __init__(self, lr, boundaries, decay):
    self.lr = float(lr)
    self.boundaries = [int(b) for b in boundaries]
    self.decay = float(decay)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
    return self.lr * tf.pow(self.decay, passed)

  def get_config(self):
    return {"lr": self.lr, "boundaries": self.boundaries, "decay": self.decay}


def weights_digest(model):
  """sha256 of every weight (trainable and BatchNorm statistics), in layer order."""
  h = hashlib.sha256()
  for w in model.get_weights():
    h.update(np.ascontiguousarray(w).tobytes())
  return h.hexdigest()


def make_optimizer(cfg, steps_per_epoch):
  if cfg.task == "lm":
    return lm.make_optimizer(cfg)  # constant rate, driven by lm.PlateauDecay
  boundaries = [int(round(m * cfg.epochs)) * steps_per_epoch for m in cfg.lr_milestones]
  schedule = StepDecay(cfg.lr, boundaries, cfg.lr_decay)
  return keras.optimizers.SGD(learning_rate=schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)


def make_checkpoint(student, optimizer, epoch_var, projection=None):
  """What an epoch checkpoint holds: everything that resuming must restore.

  Through `optimizer`: the student's trainable weights, the momentum slots and the
  step counter (which drives the learning-rate schedule and DKPP's seeds). Through
  `student`: BatchNorm statistics. `variables` adds what that tracking misses: the
  dropout layers' SeedGenerator states, so resumed dropout masks are the ones an
  uninterrupted run would draw (tests/resume_test.py). `projection`: the
  activation-matching projection layer, when there is one.
  """
  tracked = {"projection": projection} if projection is not None else {}
  return tf.train.Checkpoint(student=student, variables=list(student.variables),
                             optimizer=optimizer, epoch=epoch_var, **tracked)


class _EpochState(keras.callbacks.Callback):
  """Per epoch: NaN guard, checkpoint, history.json and TensorBoard scalars."""

  def __init__(self, gen_dir, manager, epoch_var, history, writer, optimizer):
    super().__init__()
    self.gen_dir, self.manager, self.epoch_var = gen_dir, manager, epoch_var
    self.history, self.writer, self.optimizer = history, writer, optimizer
    self.diverged = None
    self._t0 = None
    self._epoch = 0

  def _where(self, epoch):
    return f"{os.path.basename(self.gen_dir)}/epoch_{epoch + 1}"

  def on_epoch_begin(self, epoch, logs=None):
    self._t0 = time.time()
    self._epoch = epoch

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
    lr = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
    entry = dict(logs, epoch=epoch + 1, learning_rate=lr, seconds=time.time() - self._t0)
    with self.writer.as_default(step=epoch + 1):
      for k, v in logs.items():
        name = f"val/{k[4:]}" if k.startswith("val_") else f"train/{k}"
        tf.summary.scalar(name, v)
      tf.summary.scalar("train/learning_rate", lr)
    self.writer.flush()
    # history.json first: on resume it is cut back to the checkpoint's epoch, so it
    # always covers every checkpointed epoch whenever the process dies.
    self.history[:] = [h for h in self.history if h["epoch"] <= epoch] + [entry]
    export.write_json(self.history, os.path.join(self.gen_dir, "history.json"))
    faults.disk_fault_if(self._where(epoch), self.gen_dir)
    self.epoch_var.assign(epoch + 1)
    # CheckpointManager updates its `checkpoint` index only after the new files are
    # complete, and deletes old ones only then: a failed save keeps the last good one.
    self.manager.save(checkpoint_number=epoch + 1)


def _verbose(cfg):
  if cfg.verbose != "auto":
    return int(cfg.verbose)
  return 1 if sys.stdout.isatty() else 2


def _teacher_keras_path(teacher_path):
  """gen_{k-1}/model.keras next to gen_{k-1}/saved_model (for --share_stem_head)."""
  return os.path.join(os.path.dirname(os.path.abspath(teacher_path)), "model.keras")


def _share_stem_head(student, teacher_path):
  path = _teacher_keras_path(teacher_path)
  if not os.path.exists(path):
    raise errors.TeacherError(f"--share_stem_head needs the teacher's {path}: retrain that generation "
                              "or drop --share_stem_head")
  teacher = keras.saving.load_model(path, custom_objects={"StepDecay": StepDecay}, compile=False)
  try:
    models.copy_and_freeze(student, teacher)
  except ValueError as e:
    raise errors.TeacherError(
        f"--share_stem_head: {e}: use a student whose stem width and feature width equal the "
        "teacher's (e.g. wrn-match-U), or drop --share_stem_head") from None


def train_generation(cfg, gen, strategy, dataset, gen_dir, teacher_path=None, baseline=False,
                     read_dir=None):
  """Trains generation `gen` into `gen_dir`; returns its metrics dict.

  Args:
    cfg: config.Config.
    gen: generation index (0 = teacher trained on labels).
    strategy: the tf.distribute strategy everything is built under.
    dataset: data.Dataset.
    gen_dir: the generation's directory (created if needed).
    teacher_path: the previous generation's SavedModel directory (gen >= 1).
    baseline: train the same-recipe label-only baseline instead: BAN-1's
      architecture and seed, labels only, no teacher, nothing shared.
    read_dir: where to resume from (default gen_dir); a multi-worker non-chief
      writes gen_dir privately and resumes from the chief's directory.
  """
  os.makedirs(gen_dir, exist_ok=True)
  info = dataset.info
  arch = cfg.arch_for(1 if baseline else gen)
  seed = cfg.seed + (1 if baseline else gen)
  keras.utils.set_random_seed(seed)  # fresh, differently seeded student per generation
  labels_only = {"loss": "labels", "temperature": 1.0, "kd_weight": 0.0, "label_weight": 1.0}
  objective = cfg.objective() if gen > 0 and not baseline else labels_only
  if baseline:
    teacher_path = None
  steps = dataset.steps_per_epoch(cfg.batch_size)
  teacher = None
  if teacher_path:  # outside the scope: load_teacher runs the SavedModel eagerly to verify it
    teacher = export.load_teacher(teacher_path, strategy, expected_classes=info.num_classes,
                                  with_features=cfg.feature_weight > 0)
  with strategy.scope():
    name = f"gen{gen}_" + arch.replace("-", "_")
    if cfg.task == "lm":
      student = lm_models.build_model(arch, info.vocab, dropout=cfg.dropout, name=name)
    else:
      student = models.build_model(arch, info.num_classes, info.image_shape, mean=info.mean,
                                   std=info.std, dropout=cfg.dropout, name=name)
      if cfg.sync_batchnorm:
        models.synchronize_batchnorm(student)
    projection = None
    if teacher is not None:
      if cfg.feature_weight > 0:
        s_dim = student.get_layer("features").output.shape[-1]
        if cfg.feature_projection:
          projection = teacher.feature_dim
        elif s_dim != teacher.feature_dim:
          raise errors.TeacherError(
              f"--feature_weight: student features have {s_dim} dims but the teacher's have "
              f"{teacher.feature_dim}: add --feature_projection or use a same-width student")
      if cfg.share_stem_head:
        _share_stem_head(student, teacher_path)
    model = distiller_lib.Distiller(
        student, teacher, loss=objective["loss"], temperature=objective["temperature"],
        kd_weight=objective["kd_weight"], label_weight=objective["label_weight"],
        weight_decay=cfg.weight_decay, seed=seed,
        feature_weight=cfg.feature_weight if teacher is not None else 0.0,
        feature_projection=projection, clip_norm=cfg.clip_norm,
        augment=dataset.train_augmenter(seed, cfg.resolved_augment) if cfg.resolved_device_augment else None)
    optimizer = make_optimizer(cfg, steps)
    model.compile(optimizer=optimizer, steps_per_execution=cfg.steps_per_execution,
                  jit_compile=cfg.jit_compile)
    optimizer.build(model.train_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = make_checkpoint(student, optimizer, epoch_var, projection=model.projection)
  manager = tf.train.CheckpointManager(ckpt, os.path.join(gen_dir, "ckpt"), max_to_keep=2)
  read_dir = read_dir or gen_dir
  latest = tf.train.latest_checkpoint(os.path.join(read_dir, "ckpt"))
  initial_epoch = 0
  history = []
  if latest:
    ckpt.restore(latest).assert_existing_objects_matched()
    initial_epoch = int(epoch_var.numpy())
    hist_path = os.path.join(read_dir, "history.json")
    if os.path.exists(hist_path):
      history = [h for h in export.read_json(hist_path) if h["epoch"] <= initial_epoch]
    logging.info("gen %d: resuming from epoch %d (%s)", gen, initial_epoch, latest)
  # Built once, from the first epoch still to train (per-epoch shuffles: see data.py).
  on_device = {"device_augment": True} if cfg.resolved_device_augment else {}  # text: host only
  train_ds, _ = dataset.train(cfg.batch_size, seed=seed, augment=cfg.resolved_augment,
                              first_epoch=initial_epoch, epochs=cfg.epochs, **on_device)
  writer = tf.summary.create_file_writer(os.path.join(gen_dir, "tb"))
  state = _EpochState(gen_dir, manager, epoch_var, history, writer, optimizer)
  callbacks = [state]
  if cfg.task == "lm":
    callbacks.append(lm.PlateauDecay(cfg.lr, cfg.lr_plateau_decay, cfg.lr_plateau_min_delta, history, optimizer))
  role = "baseline" if baseline else "teacher" if gen == 0 else f"BAN-{gen}"
  logging.info("gen %d (%s): %s, %d params, objective %s, seed %d, teacher %s", gen, role, arch,
               student.count_params(), objective, seed, teacher_path)
  t0 = time.time()
  if initial_epoch < cfg.epochs:
    model.fit(train_ds, epochs=cfg.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
              validation_data=dataset.val(cfg.batch_size), callbacks=callbacks,
              verbose=_verbose(cfg), shuffle=False)  # the pipeline shuffles, per (seed, epoch)
  if state.diverged is not None:
    good = int(epoch_var.numpy())
    kept = (f"its last good checkpoint (epoch {good}) is kept in {gen_dir}/ckpt" if good else
            "it has no good checkpoint yet")
    raise errors.DivergedError(
        f"generation {gen} diverged (loss={state.diverged}) in epoch {good + 1}: {kept}; "
        "rerun the same command to retry from it, or start over with a lower --lr "
        "(--lr changes the experiment: add --overwrite or use a new --run_dir)")
  # Final-epoch evaluation: no selection on test (nor on val) happens anywhere.
  test = model.evaluate(dataset.test(cfg.batch_size), verbose=0, return_dict=True)
  result = {
      "gen": "baseline" if baseline else gen, "role": role, "arch": arch,
      "params": int(student.count_params()),
      "seed": seed, "objective": objective, "teacher": teacher_path,
      "epochs": cfg.epochs, "seconds": sum(h["seconds"] for h in state.history) or time.time() - t0,
      "test_accuracy": float(test["accuracy"]), "test_error": 1.0 - float(test["accuracy"]),
      "test_loss": float(test["label_loss"]),
      "weights_sha256": weights_digest(student),
  }
  if dataset.val(cfg.batch_size) is not None:
    val = model.evaluate(dataset.val(cfg.batch_size), verbose=0, return_dict=True)
    result["val_accuracy"] = float(val["accuracy"])
    result["val_loss"] = float(val["label_loss"])
  if state.history:
    result["final_train"] = {k: v for k, v in state.history[-1].items() if not k.startswith("val_")}
  with writer.as_default(step=cfg.epochs):
    tf.summary.scalar("test/accuracy", result["test_accuracy"])
    tf.summary.scalar("test/error", result["test_error"])
  writer.flush()
  if cfg.task == "lm":
    lm.finish_generation(result, gen_dir, info.vocab, writer, cfg.epochs)
  export.export_saved_model(student, os.path.join(gen_dir, "saved_model"), info.image_shape,
                            class_names=info.class_names)
  export.save_keras(student, os.path.join(gen_dir, "model.keras"))
  export.write_json(result, os.path.join(gen_dir, "metrics.json"))
  export.touch_done(gen_dir)
  shutil.rmtree(os.path.join(gen_dir, "ckpt"), ignore_errors=True)
  logging.info("gen %d (%s) done: test accuracy %.4f (error %.2f%%), weights sha256 %s", gen, role,
               result["test_accuracy"], 100 * result["test_error"], result["weights_sha256"])
  return result
