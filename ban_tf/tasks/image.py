"""Image classification: tfds images (data.py), CIFAR nets (models.py), step schedule, top-1 error.

Outputs are class logits [N, C]; the headline metric is the final-epoch top-1 test
error (%), as in the paper's Tables 1-5. SavedModels carry labels.txt (class names).
"""

import os

import numpy as np

from ban_tf import archs
from ban_tf import errors
from ban_tf import results
from ban_tf.tasks import base


def _val_error(entry):
  acc = entry.get("val_accuracy")
  return None if acc is None else 1.0 - acc


TEST_ERROR = results.Metric("test_error", "Test error (%)", percent=True, text="test error")
VAL_ERROR = results.Metric(
  "val_error", "Val error (%)", percent=True, derive=_val_error, text="val error"
)


def _check_widths(cfg):
  """--share_stem_head and --feature_weight (without --feature_projection) need the
  teacher's and the student's widths to agree: known from the names, so a misfit
  is refused before any training (BAN-k for k >= 2 is taught by the same arch)."""
  if cfg.gens < 1 or not (
    cfg.share_stem_head or (cfg.feature_weight > 0 and not cfg.feature_projection)
  ):
    return
  try:
    t_arch, s_arch = cfg.arch_for(0), cfg.arch_for(1)
    t, s = archs.widths(t_arch), archs.widths(s_arch)
  except ValueError:
    return  # a bad name: Config.validate reports it
  if cfg.share_stem_head and (t["stem"], t["features"]) != (s["stem"], s["features"]):
    raise errors.UsageError(
      f"--share_stem_head: the teacher {t_arch} has stem width {t['stem']} and {t['features']} features but the "
      f"student {s_arch} has {s['stem']} and {s['features']}: use a student with the teacher's widths "
      "(e.g. --arch=wrn-match-U with a DenseNet --teacher_arch), or drop --share_stem_head"
    )
  if cfg.feature_weight > 0 and not cfg.feature_projection and t["features"] != s["features"]:
    raise errors.UsageError(
      f"--feature_weight: the student {s_arch} has {s['features']} features but the teacher {t_arch} has "
      f"{t['features']}: add --feature_projection, or use a student of the teacher's feature width"
    )


# The language model's own flags (tasks/lm.py): refused on an image run, where they would do nothing.
_LM_FLAGS = (
  "ptb_dir",
  "vocab_size",
  "bptt",
  "lm_state",
  "lr_plateau_decay",
  "lr_plateau_min_delta",
  "lr_plateau_reference",
)


def _check_imagenet_file(arch, image_shape):
  """errors.UsageError naming where Keras looks, unless `arch`'s ImageNet weights are there."""
  from ban_tf import models  # lazy: TensorFlow; config validation imports tasks

  try:
    path, url = models.imagenet_weights_file(arch, image_shape)
  except ValueError as e:
    raise errors.UsageError(f"--init_weights=imagenet: {e}") from None
  if not os.path.isfile(path):
    raise errors.UsageError(models.missing_imagenet_message(arch, path, url))


class ImageClassification(base.Task):
  """--task=image."""

  name = "image"
  headline = TEST_ERROR
  extra_columns = (VAL_ERROR,)
  result_keys = ("test_accuracy", "test_error", "val_accuracy")
  # --train_examples, --val_examples, --train_split only change what is trained on.
  test_set_fields = (
    "dataset",
    "image_folder",
    "test_split",
    "image_size",
    "image_key",
    "label_key",
  )

  def parse_arch(self, arch):
    return archs.parse_arch(arch)

  def validate(self, cfg):
    given = base.non_default(cfg, _LM_FLAGS)
    base.require(
      not given,
      f"--{', --'.join(given)} {'applies' if len(given) == 1 else 'apply'} to language models "
      "only: add --task=lm, or drop " + ("it" if len(given) == 1 else "them"),
    )
    base.require(
      cfg.student_width_ratio == 1 or archs.is_match_arch(cfg.arch),
      f"--student_width_ratio={cfg.student_width_ratio} only applies to teacher-matched students: "
      "use --arch=wrn-match-U or prebn-match-U",
    )
    base.require(
      not archs.is_match_arch(cfg.teacher_arch or cfg.arch) or cfg.teacher_arch,
      f"--arch={cfg.arch}: a -match- student needs a DenseNet --teacher_arch",
    )
    base.require(
      0 < cfg.densenet_compression <= 1,
      f"--densenet_compression={cfg.densenet_compression}: must be in (0, 1] (DenseNet-BC: 0.5)",
    )
    if cfg.densenet_compression != archs.DENSENET_COMPRESSION:
      try:
        archs.with_compression(cfg.arch, cfg.densenet_compression)
      except ValueError as e:
        raise errors.UsageError(
          f"--densenet_compression={cfg.densenet_compression:g} applies to a "
          f"densenet-D-K --arch without a -c suffix: {e}"
        ) from None
    keras_archs = [
      a for a in (cfg.teacher_arch, cfg.arch) if a is not None and archs.is_keras_arch(a)
    ]
    base.require(
      not (cfg.share_stem_head and keras_archs),
      f'--share_stem_head: {keras_archs[0] if keras_archs else ""} has no shared "stem" layer '
      "(Keras Applications' first convolutions differ by family): drop --share_stem_head",
    )
    if cfg.image_size:
      for a in keras_archs:
        try:
          archs.check_image_size(a, cfg.image_size)
        except ValueError as e:
          raise errors.UsageError(str(e)) from None
    _check_widths(cfg)

  def load_data(self, cfg):
    from ban_tf import data  # lazy: TensorFlow; config validation imports tasks

    dataset = data.Dataset.from_config(cfg)
    # Before any training: a keras:NAME's minimum size, and its ImageNet weights on disk.
    for arch in {cfg.arch_for(gen) for gen in ((0, 1) if cfg.gens else (0,))}:
      try:
        archs.check_image_size(arch, dataset.info.image_shape)
      except ValueError as e:
        raise errors.UsageError(f"{dataset.info.name}: {e}") from None
      if cfg.init_weights == "imagenet" and archs.is_keras_arch(arch):
        _check_imagenet_file(arch, dataset.info.image_shape)
    return dataset

  def spec(self, dataset):
    info = dataset.info
    return base.DataSpec(
      name=info.name,
      input_shape=tuple(info.image_shape),
      input_dtype="float32",
      input_high=255,
      input_name="pixels",
      serving_shape=tuple(info.image_shape),
      num_outputs=info.num_classes,
      output_shape=(info.num_classes,),
      class_names=tuple(info.class_names),
      unit="examples",
      num_train=info.num_train,
      num_val=info.num_val,
      num_test=info.num_test,
    )

  def build_model(self, arch, dataset, *, dropout, name, init_weights=None):
    from ban_tf import models  # lazy: TensorFlow; config validation imports tasks

    info = dataset.info
    try:
      return models.build_model(
        arch,
        info.num_classes,
        info.image_shape,
        mean=info.mean,
        std=info.std,
        dropout=dropout,
        name=name,
        init_weights=init_weights if archs.is_keras_arch(arch) else None,
      )
    except FileNotFoundError as e:  # --init_weights=imagenet offline
      raise errors.UsageError(str(e)) from None
    except ValueError as e:
      if init_weights and archs.is_keras_arch(arch):  # weights that do not fit
        raise errors.UsageError(str(e)) from None
      raise

  def device_augment(self, cfg):
    return cfg.device_augment

  def make_optimizer(self, cfg, steps_per_epoch):
    """SGD (Nesterov) with the step schedule: x lr_decay at each milestone fraction of the epochs,
    or --lr_schedule=cosine (keras CosineDecay); either after --warmup_epochs of linear warm-up.
    Both are functions of the optimizer's step, so a resumed run replays them exactly.

    A milestone is rounded to a whole epoch, never epoch 0: with --epochs=1 the default
    0.3 would round to 0 and the first epoch would never see --lr.
    """
    import keras  # lazy: TensorFlow; config validation imports tasks
    from ban_tf import schedules  # lazy: TensorFlow; config validation imports tasks

    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.lr_schedule == "cosine":  # Keras' own: linear warm-up 0 -> lr, then cosine to 0
      schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else cfg.lr,
        decay_steps=cfg.epochs * steps_per_epoch - warmup,
        warmup_target=cfg.lr if warmup else None,
        warmup_steps=warmup,
      )
    else:
      boundaries = [max(1, int(round(m * cfg.epochs))) * steps_per_epoch for m in cfg.lr_milestones]
      schedule = schedules.StepDecay(cfg.lr, boundaries, cfg.lr_decay, warmup_steps=warmup)
    return keras.optimizers.SGD(
      learning_rate=schedule, momentum=cfg.momentum, nesterov=cfg.nesterov
    )

  def curve(self, history):
    """Per-epoch validation error (%), or training error without a val split."""
    key = "val_accuracy" if history and all("val_accuracy" in h for h in history) else "accuracy"
    epochs = [h["epoch"] for h in history]
    err = [100.0 * (1.0 - h[key]) for h in history]
    return epochs, err, "val" if key == "val_accuracy" else "train"

  curve_label = "error (%)"

  prediction_arrays = ("probabilities", "labels", "predicted")

  def per_example(self, model, dataset, split, batch_size, *, probabilities, stateful):
    """{"probabilities": float16 [N, C], "labels": int32 [N], "predicted": int32 [N]}.

    `predicted` is the argmax of the served float32 outputs (what the reported
    accuracy counts: Distiller's top-1 and evaluate.score); padding is dropped.
    """
    del stateful  # classifiers carry no state
    probs, labels, predicted = [], [], []
    for out, y, w in base.serve_batches(model, getattr(dataset, split)(batch_size)):
      keep = w > 0
      out, y = out[keep], y[keep]
      predicted.append(np.argmax(out, -1))
      probs.append(out if probabilities else np.exp(base.log_probabilities(out, False)))
      labels.append(y)
    return {
      "probabilities": np.concatenate(probs).astype(np.float16),
      "labels": np.concatenate(labels).astype(np.int32),
      "predicted": np.concatenate(predicted).astype(np.int32),
    }

  def headline_from(self, outputs):
    """Test error (%) of stored outputs: 100 * mean(predicted != labels)."""
    return 100.0 * float(np.mean(outputs["predicted"] != outputs["labels"]))

  def compare(self, row, ref, *, seed=0):
    """Δ top-1 error (percentage points): paired bootstrap over examples + exact McNemar."""
    from ban_tf import stats  # lazy: SciPy (~1 s CPU); config validation imports tasks

    if not np.array_equal(row["labels"], ref["labels"]):
      raise ValueError("the two models were not scored on the same examples (labels differ)")
    return stats.paired_classification(
      row["predicted"] == row["labels"], ref["predicted"] == ref["labels"], seed=seed
    )
