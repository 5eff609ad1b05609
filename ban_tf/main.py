"""ban_tf binary: flags -> Config -> strategy -> generations.run -> results table.

  python -m ban_tf.main --dataset=cifar10 --gens=3
  python -m ban_tf.main --flagfile=flags/smoke.flags --data_dir=../shared/tensorflow_datasets

Bad input is one line on stderr and exit code 2, before anything is written.
"""

import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

import ban_tf

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """Defines the binary's flags on `fv` (called once, from __main__ or a test)."""
  flags = _Definer(fv)
  # Data.
  flags.DEFINE_string("task", "image", "[data] image (classification) or lm (word-level language modelling).")
  flags.DEFINE_string("dataset", "cifar10", "[data] tfds data set name (lm: ptb or tiny_shakespeare).")
  flags.DEFINE_string("data_dir", None, "[data] TFDS data directory (a prepared one works offline).")
  flags.DEFINE_integer("train_examples", 0, "[data] Use only the first N training examples (0 = all).")
  flags.DEFINE_integer("val_examples", 0, "[data] Hold out the last N training examples as validation.")
  flags.DEFINE_string("image_folder", None, "[data] Your own images instead of --dataset: DIR/train/<class>/*, "
                      "DIR/test/<class>/*, optional DIR/val/<class>/* (png, jpeg, bmp, gif).")
  flags.DEFINE_string("train_split", "train", "[data] tfds split to train on; slices work (train[:90%]).")
  flags.DEFINE_string("val_split", None, "[data] tfds split to validate on (e.g. validation, train[90%:]); "
                      "instead of --val_examples.")
  flags.DEFINE_string("test_split", "test", "[data] tfds split to test on.")
  flags.DEFINE_list("image_size", [], "[data] H,W: resize every image (needed when sizes vary).")
  flags.DEFINE_string("image_key", None, "[data] tfds feature holding the image (default image).")
  flags.DEFINE_string("label_key", None, "[data] tfds feature holding the class label (default label).")
  flags.DEFINE_string("augment", "auto", "[data] auto|none|crop|flip|flip_crop (auto: no flips for digits).")
  flags.DEFINE_bool("device_augment", True, "[data] Augment inside the compiled train step (the host only "
                    "reads, shuffles and batches uint8); false: per example in tf.data. Same batches either way.")
  flags.DEFINE_string("ptb_dir", None, "[data] lm: directory with ptb.{train,valid,test}.txt (Mikolov format).")
  flags.DEFINE_integer("vocab_size", 0, "[data] lm: cap the vocabulary at N words incl. <unk>, <eos> (0 = all).")
  flags.DEFINE_integer("bptt", 35, "[data] lm: unrolled steps per training window.")
  # Models.
  flags.DEFINE_string("arch", "wrn-28-1", "[model] Student architecture: wrn-D-K, densenet-D-K, preact-resnet-D, tiny, "
                      "wrn-match-U / prebn-match-U (widths from a DenseNet --teacher_arch), "
                      "wrnw-U-S-W1-W2-W3[-F] / prebw-U-S-W1-W2-W3[-F] (explicit widths); "
                      "lm: lstm-L-H, cnn-lstm[-small|-large].")
  flags.DEFINE_string("teacher_arch", None, "[model] Generation 0's architecture (default: --arch).")
  flags.DEFINE_float("student_width_ratio", 1.0,
                     "[model] wrn-match-U / prebn-match-U students: stage widths = ratio x the DenseNet "
                     "teacher's block outputs (paper: 1 or 0.5).")
  flags.DEFINE_bool("share_stem_head", False,
                    "[model] Copy the teacher's first conv and classifier into each student and freeze them "
                    "(Table 5; reads gen_{k-1}/model.keras).")
  flags.DEFINE_float("densenet_compression", 0.5,
                     "[model] Transition compression of a DenseNet --arch (students; the teacher too "
                     "without --teacher_arch): channels x THETA (DenseNet-BC: 0.5; Table 4: 0.25, 0.375, 0.75).")
  flags.DEFINE_float("dropout", 0.0, "[model] Dropout rate inside WRN blocks (the WRN paper uses 0.3); "
                     "lm: on every non-recurrent connection.")
  # Distillation.
  flags.DEFINE_integer("gens", 3, "[distill] Number of born-again generations after the teacher.")
  flags.DEFINE_string("loss", "ban", "[distill] Student objective: ban|ban_l|kd|cwtm|dkpp.")
  flags.DEFINE_float("temperature", 1.0, "[distill] Softmax temperature T of the KD term (scaled by T^2).")
  flags.DEFINE_float("kd_weight", 1.0, "[distill] Weight of the KD term.")
  flags.DEFINE_float("label_weight", 0.0, "[distill] Weight of the label cross-entropy (>0 makes ban into BAN+L).")
  flags.DEFINE_bool("ensemble_include_teacher", False, "[distill] Include generation 0 in BANE ensembles.")
  flags.DEFINE_float("feature_weight", 0.0,
                     "[distill] Activation matching: weight of mean_batch (1/D)||f_s - f_t||^2 on the "
                     "penultimate (pooled) features.")
  flags.DEFINE_bool("feature_projection", False,
                    "[distill] Learned Dense projection of the student's features to the teacher's width.")
  # Optimisation.
  flags.DEFINE_integer("epochs", 200, "[optim] Epochs per generation.")
  flags.DEFINE_integer("batch_size", 128, "[optim] Global batch size (split over replicas).")
  flags.DEFINE_float("lr", 0.1, "[optim] Initial learning rate (lm: of the per-token mean loss, so a recipe on "
                     "the loss summed over the unrolled steps needs its lr x --bptt; docs/lm.md).")
  flags.DEFINE_float("momentum", 0.9, "[optim] SGD momentum.")
  flags.DEFINE_bool("nesterov", True, "[optim] Nesterov momentum.")
  flags.DEFINE_float("weight_decay", 5e-4, "[optim] Coupled L2 weight decay.")
  flags.DEFINE_list("lr_milestones", ["0.3", "0.6", "0.8"], "[optim] LR decay points as fractions of --epochs.")
  flags.DEFINE_float("lr_decay", 0.2, "[optim] LR multiplier at each milestone.")
  flags.DEFINE_float("lr_plateau_decay", 0.25, "[optim] lm: LR multiplier when val perplexity does not improve.")
  flags.DEFINE_float("lr_plateau_min_delta", 0.0, "[optim] lm: improvement in val perplexity that counts.")
  flags.DEFINE_float("clip_norm", 0.0, "[optim] Clip the global gradient norm to this value (0 = off; lm: a "
                     "summed-loss recipe's clip / --bptt).")
  # Execution.
  flags.DEFINE_integer("seed", 0, "[run] Base seed; generation k uses seed + k.")
  flags.DEFINE_integer("seeds", 1, "[run] Repeat the run with base seeds seed, seed+100, ... into "
                       "run_dir/seed_S/ and report mean +- std.")
  flags.DEFINE_bool("baseline", False, "[run] Also train a label-only baseline (student arch and seed).")
  flags.DEFINE_string("run_dir", None, "[run] Output directory (default runs/<dataset>-<arch>-<loss>-seed<seed>).")
  flags.DEFINE_integer("num_cpu_devices", 0, "[run] Mirror over N logical CPU devices (testing multi-replica).")
  flags.DEFINE_string("strategy", "auto", "[run] auto (one device, --num_cpu_devices or all GPUs) or "
                      "multi_worker (MultiWorkerMirroredStrategy from TF_CONFIG; --run_dir on shared storage).")
  flags.DEFINE_bool("deterministic", False, "[run] Enable TF op determinism (slower; identical reruns).")
  flags.DEFINE_bool("sync_batchnorm", False, "[run] BatchNorm on the global batch's statistics across replicas "
                    "(default: per-replica batch statistics, moving statistics averaged every step).")
  flags.DEFINE_bool("overwrite", False, "[run] Delete an existing --run_dir and start over.")
  flags.DEFINE_integer("steps_per_execution", 1, "[run] Train steps per compiled call.")
  flags.DEFINE_bool("jit_compile", False, "[run] Compile the train step with XLA.")
  flags.DEFINE_string("mixed_precision", "none", "[run] none|bf16|fp16.")
  flags.DEFINE_string("verbose", "auto", "[run] Keras verbosity: auto|0|1|2.")


GROUPS = (("data", "Data"), ("model", "Models"), ("distill", "Distillation: generations and objective"),
          ("optim", "Optimisation"), ("run", "Execution"))


def flag_groups(fv):
  """[(title, [(name, default, help without its [tag])])] of the flags define_flags made."""
  by_tag = {tag: [] for tag, _ in GROUPS}
  for name in fv:  # definition order: define_flags lists them by importance
    flag = fv[name]
    m = re.match(r"\[(\w+)\] (.*)", flag.help or "")
    if flag.name == name and m and m.group(1) in by_tag:
      default = flag.default
      default = (",".join(default) if isinstance(default, list) else str(default).lower()
                 if isinstance(default, bool) else "" if default is None else str(default))
      by_tag[m.group(1)].append((name, default, m.group(2)))
  return [(title, by_tag[tag]) for tag, title in GROUPS if by_tag[tag]]


def grouped_help(fv):
  """--help: the flags grouped by purpose, one line each (absl groups them by module)."""
  lines = [__doc__.strip().splitlines()[0], "", "usage: python -m ban_tf.main [--flag=value ...]"]
  for title, entries in flag_groups(fv):
    lines += ["", f"{title}:"]
    lines += [f"  --{name}={default}".ljust(36) + f" {text}" for name, default, text in entries]
  lines += ["", "--flagfile=FILE reads flags from a file (see flags/); --helpfull also lists absl's own flags."]
  return "\n".join(lines)


class _Definer:
  """absl's DEFINE_* bound to one FlagValues, so tests can use a fresh one."""

  def __init__(self, fv):
    self._fv = fv

  def __getattr__(self, name):
    define = getattr(flags, name)
    return lambda *a, **k: define(*a, flag_values=self._fv, **k)


def config_from_flags(fv):
  from ban_tf import config as config_lib  # pylint: disable=g-import-not-at-top
  from ban_tf import errors  # pylint: disable=g-import-not-at-top
  try:
    milestones = tuple(float(m) for m in fv.lr_milestones)
  except ValueError:
    raise errors.UsageError(f"--lr_milestones={','.join(fv.lr_milestones)}: use comma-separated fractions") from None
  try:
    image_size = tuple(int(v) for v in fv.image_size)
  except ValueError:
    raise errors.UsageError(f"--image_size={','.join(fv.image_size)}: use two integers H,W (e.g. 32,32)") from None
  return config_lib.Config(
      image_folder=fv.image_folder, train_split=fv.train_split, val_split=fv.val_split,
      test_split=fv.test_split, image_size=image_size, image_key=fv.image_key, label_key=fv.label_key,
      task=fv.task, ptb_dir=fv.ptb_dir, vocab_size=fv.vocab_size, bptt=fv.bptt,
      lr_plateau_decay=fv.lr_plateau_decay, lr_plateau_min_delta=fv.lr_plateau_min_delta,
      clip_norm=fv.clip_norm,
      dataset=fv.dataset, data_dir=fv.data_dir, train_examples=fv.train_examples,
      val_examples=fv.val_examples, augment=fv.augment,
      device_augment=fv.device_augment, arch=fv.arch, teacher_arch=fv.teacher_arch,
      student_width_ratio=fv.student_width_ratio, share_stem_head=fv.share_stem_head,
      densenet_compression=fv.densenet_compression,
      feature_weight=fv.feature_weight, feature_projection=fv.feature_projection,
      seeds=fv.seeds, baseline=fv.baseline, dropout=fv.dropout, gens=fv.gens, loss=fv.loss, temperature=fv.temperature,
      kd_weight=fv.kd_weight, label_weight=fv.label_weight,
      ensemble_include_teacher=fv.ensemble_include_teacher, epochs=fv.epochs,
      batch_size=fv.batch_size, lr=fv.lr, momentum=fv.momentum, nesterov=fv.nesterov,
      weight_decay=fv.weight_decay, lr_milestones=milestones, lr_decay=fv.lr_decay, seed=fv.seed,
      run_dir=fv.run_dir, num_cpu_devices=fv.num_cpu_devices, strategy=fv.strategy, deterministic=fv.deterministic,
      sync_batchnorm=fv.sync_batchnorm,
      overwrite=fv.overwrite, steps_per_execution=fv.steps_per_execution,
      jit_compile=fv.jit_compile, mixed_precision=fv.mixed_precision, verbose=fv.verbose)


def make_strategy(num_cpu_devices=0, kind="auto"):
  """MirroredStrategy over >= 2 GPUs or N logical CPUs; the default strategy otherwise.

  kind="multi_worker" gives a MultiWorkerMirroredStrategy configured from TF_CONFIG.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ban_tf import cluster  # pylint: disable=g-import-not-at-top
  from ban_tf import errors  # pylint: disable=g-import-not-at-top
  if kind == "multi_worker":
    if not os.environ.get("TF_CONFIG"):
      raise errors.UsageError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                              "(cluster and task; see README 'Several hosts')")
    return cluster.make_strategy()
  if num_cpu_devices > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_cpu_devices)])
    except RuntimeError:  # runtime already initialised (e.g. inside a test process)
      pass
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < num_cpu_devices:
      raise errors.UsageError(
          f"--num_cpu_devices={num_cpu_devices}: only {len(logical)} logical CPUs exist in this process "
          "(configure them before TensorFlow starts)")
    # ReductionToOneDevice: CPU collectives gain nothing here, and their instance keys
    # can clash when a process creates several strategies (tests, notebooks).
    return tf.distribute.MirroredStrategy([d.name for d in logical[:num_cpu_devices]],
                                          cross_device_ops=tf.distribute.ReductionToOneDevice())
  if len(tf.config.list_physical_devices("GPU")) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def run(cfg):
  """Validates, prepares data, trains all generations; returns results. Raises UsageError."""
  # Validate before importing TensorFlow: a bad flag is reported at once, cleanly.
  cfg.validate(num_replicas=max(cfg.num_cpu_devices, 1))
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from ban_tf import cluster  # pylint: disable=g-import-not-at-top
  from ban_tf import data  # pylint: disable=g-import-not-at-top
  from ban_tf import errors  # pylint: disable=g-import-not-at-top
  from ban_tf import generations  # pylint: disable=g-import-not-at-top
  from ban_tf import rundir  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel("ERROR")  # TF's own savers log every file they write at INFO
  strategy = make_strategy(cfg.num_cpu_devices, cfg.strategy)
  cfg.validate(num_replicas=strategy.num_replicas_in_sync)
  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  if cfg.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg.mixed_precision == "bf16" else "mixed_float16")
  if cfg.task == "lm":
    from ban_tf import text_data  # pylint: disable=g-import-not-at-top
    dataset = text_data.TextDataset(cfg.dataset, ptb_dir=cfg.ptb_dir, data_dir=cfg.data_dir,
                                    vocab_size=cfg.vocab_size, bptt=cfg.bptt)
  else:
    dataset = data.Dataset.from_config(cfg)
  dataset.steps_per_epoch(cfg.batch_size)  # validates the batch size
  run_dir = cfg.run_dir or cfg.default_run_dir()
  logging.info("config: %s", cfg.to_json())
  logging.info("strategy: %s with %d replica(s); data: %s", type(strategy).__name__,
               strategy.num_replicas_in_sync, dataset.info)
  logging.info("tensorflow %s, keras %s, oneDNN CPU kernels: %s (TF_ENABLE_ONEDNN_OPTS)",
               tf.__version__, keras.__version__, ban_tf.onednn_enabled())
  # Multi-worker: only the chief writes run_dir; the others write a private temp dir
  # (saving and evaluating are collective) and read what they need from run_dir.
  write_dir = cluster.write_dir(run_dir, strategy)
  try:
    with rundir.RunDir(write_dir, cfg, num_classes=dataset.info.num_classes,
                       read_path=run_dir) as run_handle:
      cluster.barrier(strategy)  # the chief has checked, cleaned (--overwrite) and locked run_dir
      try:
        if cfg.seeds > 1:
          results = generations.run_seeds(cfg, strategy, dataset, run_handle)
        else:
          results = generations.run(cfg, strategy, dataset, run_handle)
      except (OSError, tf.errors.OpError) as e:
        if not errors.is_disk_full(e):
          raise
        raise errors.DiskFullError(
            f"no space left on the device of {run_dir}: free some space and rerun the same command "
            "(it resumes from the last good checkpoint, which is kept)") from None
    print(open(os.path.join(write_dir, "results.md")).read())
  finally:
    cluster.remove_write_dir(write_dir, run_dir)
  return results


def main(argv):
  from ban_tf import errors  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
  try:
    run(config_from_flags(FLAGS))
  except errors.UsageError as e:
    _fail(str(e))
  except errors.DivergedError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _fail(msg):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  if any(a in ("--help", "-help", "-h", "--helpshort", "-?") for a in argv[1:]):
    print(grouped_help(FLAGS))
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e} (see --help)")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse)
