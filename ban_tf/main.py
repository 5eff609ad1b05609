"""ban_tf binary: flags -> Config -> task -> strategy -> generations.run -> results table.

  python -m ban_tf.main --dataset=cifar10 --gens=3
  python -m ban_tf.main --flagfile=flags/smoke.flags --data_dir=../shared/tensorflow_datasets

Bad input is one line on stderr and exit code 2, before anything is written.
"""

import dataclasses
import os
import re
import sys
import typing

from absl import flags
from absl import logging

import ban_tf
from ban_tf import archs
from ban_tf import checks
from ban_tf import config as config_lib
from ban_tf import console
from ban_tf import errors
from ban_tf import flagfile
from ban_tf import tasks

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """Defines the binary's flags on `fv` (called once, from __main__ or a test).

  One flag per config.Config field, with the field's name, type and default (the
  one source of defaults); only the help text is written here.
  """
  flags = _Definer(fv)
  # Data.
  flags.field("task", "[data] image (classification) or lm (word-level language modelling).")
  flags.field("dataset", "[data] tfds data set name (lm: ptb or tiny_shakespeare).")
  flags.field("data_dir", "[data] TFDS data directory (a prepared one works offline).")
  flags.field("train_examples", "[data] Use only the first N training examples (0 = all).")
  flags.field("val_examples", "[data] Hold out the last N training examples as validation.")
  flags.field(
    "image_folder",
    "[data] Your own images instead of --dataset: DIR/train/<class>/*, "
    "DIR/test/<class>/*, optional DIR/val/<class>/* (png, jpeg, bmp, gif).",
  )
  flags.field("train_split", "[data] tfds split to train on; slices work (train[:90%]).")
  flags.field(
    "val_split",
    "[data] tfds split to validate on (e.g. validation, train[90%:]); instead of --val_examples.",
  )
  flags.field("test_split", "[data] tfds split to test on.")
  flags.field("image_size", "[data] H,W: resize every image (needed when sizes vary).")
  flags.field("image_key", "[data] tfds feature holding the image (default image).")
  flags.field("label_key", "[data] tfds feature holding the class label (default label).")
  flags.field(
    "augment",
    "[data] auto|none|crop|flip|flip_crop|inception (auto: no flips for digits; inception: "
    "random-resized crop + flip, resize + centre-crop evaluation; docs/data.md).",
  )
  flags.field(
    "device_augment",
    "[data] Augment inside the compiled train step (the host only "
    "reads, shuffles and batches uint8); false: per example in tf.data. Same batches either way.",
  )
  flags.field("ptb_dir", "[data] lm: directory with ptb.{train,valid,test}.txt (Mikolov format).")
  flags.field(
    "vocab_size", "[data] lm: cap the vocabulary at N words incl. <unk>, <eos> (0 = all)."
  )
  flags.field("bptt", "[data] lm: unrolled steps per training window.")
  flags.field(
    "lm_state",
    "[data] lm: carry (the LSTM state flows across consecutive windows of each batch "
    "row, teacher included, reset per epoch; evaluation runs each split as one stream) or reset "
    "(every window starts from zeros).",
  )
  # Models.
  flags.field(
    "arch",
    "[model] Student architecture: wrn-D-K, densenet-D-K, preact-resnet-D, tiny, "
    "wrn-match-U / prebn-match-U (widths from a DenseNet --teacher_arch), "
    "wrnw-U-S-W1-W2-W3[-F] / prebw-U-S-W1-W2-W3[-F] (explicit widths), "
    f"keras:NAME (a fresh Keras Applications backbone, docs/backbones.md: {archs.KERAS_HELP}); "
    "lm: lstm-L-H, cnn-lstm[-small|-large].",
  )
  flags.field("teacher_arch", "[model] Generation 0's architecture (default: --arch).")
  flags.field(
    "init_weights",
    "[model] keras:NAME only: every generation's backbone starts from these weights instead of "
    "from scratch (the paper's BAN): imagenet (Keras' file in ~/.keras/models; offline it must be "
    "there) or a weights file of the backbone without its top; the classifier starts fresh.",
  )
  flags.field(
    "student_width_ratio",
    "[model] wrn-match-U / prebn-match-U students: stage widths = ratio x the DenseNet "
    "teacher's block outputs (paper: 1 or 0.5).",
  )
  flags.field(
    "share_stem_head",
    "[model] Copy the teacher's first conv and classifier into each student and freeze them "
    "(Table 5; reads gen_{k-1}/model.keras).",
  )
  flags.field(
    "densenet_compression",
    "[model] Transition compression of a DenseNet --arch (students; the teacher too "
    "without --teacher_arch): channels x THETA (DenseNet-BC: 0.5; Table 4: 0.25, 0.375, 0.75).",
  )
  flags.field(
    "dropout",
    "[model] Dropout rate inside WRN blocks (the WRN paper uses 0.3); "
    "lm: on every non-recurrent connection.",
  )
  flags.field(
    "teacher_dropout",
    "[model] Generation 0's dropout (default: --dropout), e.g. a WRN teacher at 0.3 "
    "with a DenseNet student at 0 (Table 3).",
  )
  flags.field(
    "teacher",
    "[model] Use PATH as generation 0 instead of training one: a run's gen_k/ directory, a "
    "SavedModel (serving_default: float32 pixels [N,H,W,C] in [0,255] -> logits) or a .keras file; "
    "with --seeds, {seed} in PATH is each seed's own (e.g. runs/t/seed_{seed}/gen_0).",
  )
  flags.field(
    "teacher_outputs",
    "[model] What --teacher outputs: logits, or probabilities (softmax; used as "
    "log-probabilities, which give the same softmax at every temperature).",
  )
  # Distillation.
  flags.field("gens", "[distill] Number of born-again generations after the teacher.")
  flags.field("loss", "[distill] Student objective: ban|ban_l|kd|cwtm|dkpp.")
  flags.field("temperature", "[distill] Softmax temperature T of the KD term (scaled by T^2).")
  flags.field("kd_weight", "[distill] Weight of the KD term.")
  flags.field(
    "label_weight", "[distill] Weight of the label cross-entropy (>0 makes ban into BAN+L)."
  )
  flags.field("ensemble_include_teacher", "[distill] Include generation 0 in BANE ensembles.")
  flags.field(
    "feature_weight",
    "[distill] Activation matching: weight of mean_batch (1/D)||f_s - f_t||^2 on the "
    "penultimate (pooled) features.",
  )
  flags.field(
    "feature_projection",
    "[distill] Learned Dense projection of the student's features to the teacher's width.",
  )
  # Optimisation.
  flags.field("epochs", "[optim] Epochs per generation.")
  flags.field("batch_size", "[optim] Global batch size (split over replicas).")
  flags.field(
    "lr",
    "[optim] Initial learning rate (lm: of the per-token mean loss, so a recipe on "
    "the loss summed over the unrolled steps needs its lr x --bptt; docs/lm.md).",
  )
  flags.field("momentum", "[optim] SGD momentum.")
  flags.field("nesterov", "[optim] Nesterov momentum.")
  flags.field("weight_decay", "[optim] Coupled L2 weight decay.")
  flags.field(
    "lr_milestones",
    "[optim] LR decay points as fractions of --epochs (rounded to whole epochs, >= 1).",
  )
  flags.field("lr_decay", "[optim] LR multiplier at each milestone.")
  flags.field(
    "lr_schedule",
    "[optim] image: step (x --lr_decay at each --lr_milestones) or cosine (Keras CosineDecay "
    "from --lr to 0 over the epochs after the warm-up).",
  )
  flags.field(
    "warmup_epochs",
    "[optim] image: linear warm-up from 0 to --lr over the first N epochs (Goyal et al. 2017: 5).",
  )
  flags.field("lr_plateau_decay", "[optim] lm: LR multiplier when val perplexity does not improve.")
  flags.field("lr_plateau_min_delta", "[optim] lm: improvement in val perplexity that counts.")
  flags.field(
    "lr_plateau_reference",
    "[optim] lm: best (decay unless val perplexity beats the best epoch so far "
    "by more than the delta) or previous (decay when it fell by less than the delta since the "
    "previous epoch).",
  )
  flags.field(
    "clip_norm",
    "[optim] Clip the global gradient norm to this value (0 = off; lm: a "
    "summed-loss recipe's clip / --bptt).",
  )
  # Execution.
  flags.field("seed", "[run] Base seed; generation k uses seed + k.")
  flags.field(
    "student_seed",
    "[run] BAN-1's seed (BAN-k: + k - 1; default seed + 1): students of one "
    "--teacher with different seeds (Table 2's BAN and BAN-1).",
  )
  flags.field(
    "seeds",
    "[run] Repeat the run with base seeds seed, seed+100, ... into "
    "run_dir/seed_S/ and report mean +- std.",
  )
  flags.field("baseline", "[run] Also train a label-only baseline (student arch and seed).")
  flags.field(
    "run_dir", "[run] Output directory (default runs/<dataset>-<arch>-<loss>-seed<seed>)."
  )
  flags.field("num_cpu_devices", "[run] Mirror over N logical CPU devices (testing multi-replica).")
  flags.field(
    "strategy",
    "[run] auto (one device, --num_cpu_devices or all GPUs) or "
    "multi_worker (MultiWorkerMirroredStrategy from TF_CONFIG; --run_dir on shared storage).",
  )
  flags.field("deterministic", "[run] Enable TF op determinism (slower; identical reruns).")
  flags.field(
    "sync_batchnorm",
    "[run] BatchNorm on the global batch's statistics across replicas "
    "(default: per-replica batch statistics, moving statistics averaged every step).",
  )
  flags.field("overwrite", "[run] Delete an existing --run_dir and start over.")
  flags.field(
    "steps_per_execution",
    "[run] Train steps per compiled call (the largest divisor of the steps per epoch not above "
    "it: epochs end where they would with 1).",
  )
  flags.field("jit_compile", "[run] Compile the train step with XLA.")
  flags.field("mixed_precision", "[run] none|bf16|fp16.")
  flags.field(
    "verbose",
    "[run] Console: auto (progress bar on a terminal, one line per epoch, warnings), "
    "0 (no bar), 1 or 2 (Keras' verbosity, and every log line, TensorFlow's too; a bare "
    "--verbose is 1). log.txt in the run directory always has every log line.",
  )


GROUPS = (
  ("data", "Data"),
  ("model", "Models"),
  ("distill", "Distillation: generations and objective"),
  ("optim", "Optimisation"),
  ("run", "Execution"),
)


def flag_groups(fv):
  """[(title, [(name, default, help without its [tag])])] of the flags define_flags made."""
  by_tag = {tag: [] for tag, _ in GROUPS}
  for name in fv:  # definition order: define_flags lists them by importance
    flag = fv[name]
    m = re.match(r"\[(\w+)\] (.*)", flag.help or "")
    if flag.name == name and m and m.group(1) in by_tag:
      default = flag.default
      default = (
        ",".join(default)
        if isinstance(default, list)
        else str(default).lower()
        if isinstance(default, bool)
        else ""
        if default is None
        else str(default)
      )
      by_tag[m.group(1)].append((name, default, m.group(2)))
  return [(title, by_tag[tag]) for tag, title in GROUPS if by_tag[tag]]


def grouped_help(fv):
  """--help: the flags grouped by purpose, one line each (absl groups them by module)."""
  lines = [__doc__.strip().splitlines()[0], "", "usage: python -m ban_tf.main [--flag=value ...]"]
  for title, entries in flag_groups(fv):
    lines += ["", f"{title}:"]
    lines += [f"  --{name}={default}".ljust(36) + f" {text}" for name, default, text in entries]
  lines += [
    "",
    "--flagfile=FILE reads flags from a file (see flags/); --helpfull also lists absl's own flags.",
  ]
  return "\n".join(lines)


class _Definer:
  """absl's DEFINE_* bound to one FlagValues, so tests can use a fresh one."""

  def __init__(self, fv):
    self._fv = fv

  def field(self, name, help_text):
    """The flag of config.Config's field `name`: its type and default come from the field."""
    f = {f.name: f for f in dataclasses.fields(config_lib.Config)}[name]
    default, kind = f.default, f.type
    if typing.get_origin(kind) is typing.Union:  # Optional[X]: an X flag whose default is None
      kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if isinstance(default, tuple):
      return self.DEFINE_list(name, [str(v) for v in default], help_text)
    define = {bool: self.DEFINE_bool, int: self.DEFINE_integer, float: self.DEFINE_float}.get(
      kind if isinstance(kind, type) else type(default), self.DEFINE_string
    )
    return define(name, default, help_text)

  def __getattr__(self, name):
    define = getattr(flags, name)
    return lambda *a, **k: define(*a, flag_values=self._fv, **k)


def config_from_flags(fv):
  """config.Config.from_flags(fv): the Config of the parsed flags."""
  return config_lib.Config.from_flags(fv)


def make_strategy(num_cpu_devices=0, kind="auto"):
  """MirroredStrategy over >= 2 GPUs or N logical CPUs; the default strategy otherwise.

  kind="multi_worker" gives a MultiWorkerMirroredStrategy configured from TF_CONFIG.
  """
  import tensorflow as tf  # lazy: TensorFlow; a bad flag errors before it loads
  from ban_tf import cluster  # lazy: TensorFlow; a bad flag errors before it loads

  if kind == "multi_worker":
    if not os.environ.get("TF_CONFIG"):
      raise errors.UsageError(
        "--strategy=multi_worker needs the TF_CONFIG environment variable "
        "(cluster and task; see docs/distribution.md 'Launching on several hosts')"
      )
    return cluster.make_strategy()
  if num_cpu_devices > 1:
    cpu = tf.config.list_physical_devices("CPU")[0]
    # Never fewer than the process configured (a test process or notebook that set up 3 and
    # runs 2 then 3): the configuration holds for the life of the process once TF starts.
    if len(tf.config.get_logical_device_configuration(cpu) or []) < num_cpu_devices:
      try:
        tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_cpu_devices)]
        )
      except RuntimeError:  # runtime already initialised (e.g. inside a test process)
        pass
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < num_cpu_devices:
      raise errors.UsageError(
        f"--num_cpu_devices={num_cpu_devices}: only {len(logical)} logical CPUs exist in this process "
        "(configure them before TensorFlow starts)"
      )
    # ReductionToOneDevice: CPU collectives gain nothing here, and their instance keys
    # can clash when a process creates several strategies (tests, notebooks).
    return tf.distribute.MirroredStrategy(
      [d.name for d in logical[:num_cpu_devices]],
      cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
  if len(tf.config.list_physical_devices("GPU")) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def run(cfg):
  """Validates, prepares data, trains all generations; returns results. Raises UsageError."""
  # Validate before importing TensorFlow: a bad flag is reported at once, cleanly.
  cfg.validate(num_replicas=max(cfg.num_cpu_devices, 1))
  cfg.check_paths()
  console.import_tensorflow(
    cfg.verbose
  )  # before anything else loads it: its start-up noise goes to log.txt
  import keras  # lazy: loaded quietly just above, after validation
  import tensorflow as tf  # lazy: loaded quietly just above, after validation

  with console.quiet_logs(cfg.verbose):
    return _run(cfg, console, keras, tf)


def _run(cfg, console, keras, tf):
  """run() once TensorFlow is imported and the console quiet."""
  from ban_tf import cluster  # lazy: TensorFlow; a bad flag errors before it loads
  from ban_tf import generations  # lazy: TensorFlow; a bad flag errors before it loads
  from ban_tf import pretrained  # lazy: TensorFlow; a bad flag errors before it loads
  from ban_tf import rundir  # lazy: TensorFlow; a bad flag errors before it loads

  strategy = make_strategy(cfg.num_cpu_devices, cfg.strategy)
  cfg.validate(num_replicas=strategy.num_replicas_in_sync)
  if cfg.deterministic:
    tf.config.experimental.enable_op_determinism()
  if cfg.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if cfg.mixed_precision == "bf16" else "mixed_float16"
    )
  task = tasks.get(cfg.task)
  dataset = task.load_data(cfg)
  spec = task.spec(dataset)
  dataset.steps_per_epoch(cfg.batch_size)  # validates the batch size
  run_dir = cfg.run_dir or cfg.default_run_dir()
  checked = set()  # before the run directory records them: a misfit changes nothing
  for sub in cfg.seed_runs():  # each seed's teacher ({seed}), or the one fixed teacher once
    path = sub.resolved_teacher
    if path and path not in checked and not checks.imported_into(sub.run_dir, path):
      pretrained.check_teacher(sub, spec)
      checked.add(path)
  # Multi-worker: only the chief writes run_dir; the others write a private temp dir
  # (saving and evaluating are collective) and read what they need from run_dir.
  write_dir = cluster.write_dir(run_dir, strategy)
  try:
    with (
      rundir.RunDir(write_dir, cfg, spec=spec, read_path=run_dir) as run_handle,
      console.log_file(write_dir) as log_path,
      console.run_progress(cfg.trained_epochs, cfg.gens) as progress,
    ):
      progress.print(console.summary_line(cfg, strategy.num_replicas_in_sync, spec))
      progress.print(
        f"run directory {run_dir} (config.json: every flag; {os.path.basename(log_path)}: "
        "every log line)"
      )
      note = cfg.seeds_note()  # one fixed --teacher under --seeds: the spread excludes it
      if note:
        progress.print(note)
        logging.info("%s", note)
      logging.info("config: %s", cfg.to_json())
      logging.info(
        "strategy: %s with %d replica(s); task %s; data: %s",
        type(strategy).__name__,
        strategy.num_replicas_in_sync,
        task.name,
        spec,
      )
      logging.info(
        "tensorflow %s, keras %s, oneDNN CPU kernels: %s (TF_ENABLE_ONEDNN_OPTS)",
        tf.__version__,
        keras.__version__,
        ban_tf.onednn_enabled(),
      )
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
          "(it resumes from the last good checkpoint, which is kept)"
        ) from None
    print(open(run_handle.results_md_path).read())
  finally:
    cluster.remove_write_dir(write_dir, run_dir)
  return results


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
  try:
    with console.interruptible():
      run(config_from_flags(FLAGS))
  except console.Interrupted as e:
    # Ctrl-C / SIGTERM: the last epoch checkpoint is kept (console.py); no traceback.
    print(console.interrupted_line(e), file=sys.stderr)
    sys.exit(e.exit_code)
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
  argv = [a if a != "--verbose" else "--verbose=1" for a in argv]  # a bare --verbose: details back
  argv = flagfile.resolve_argv(argv)  # --flagfile=flags/...: ban_tf's own, when not under the cwd
  if any(a in ("--help", "-help", "-h", "--helpshort", "-?") for a in argv[1:]):
    print(grouped_help(FLAGS))
    sys.exit(0)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # absl prefixes some messages (e.g. a missing --flagfile) with "ERROR:: ".
    _fail(re.sub(r"^(ERROR:+\s*)+", "", str(e)) + " (see --help)")


if __name__ == "__main__":
  define_flags()
  console.run_app(main, flags_parser=_parse)
