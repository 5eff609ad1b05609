"""Benchmark binary: images/s of a supervised step, a BAN step and the input pipeline.

  python -m ban_tf.bench --arch=preact-resnet-20 --batch_size=128 --steps=30
  python -m ban_tf.bench --dataset=fashion_mnist --data_dir=../shared/tensorflow_datasets
  python -m ban_tf.bench --dataset=cifar10 --mock_data --train_examples=50000  # tfds mock pixels

It measures, in one process and with the training binary's own flags (so
`--jit_compile`, `--steps_per_execution`, `--mixed_precision`, `--weight_decay`
... mean the same thing):

  (a) supervised: the Distiller with `teacher=None`, i.e. generation 0's step;
  (b) distill: the same Distiller taught by a SavedModel of the same
      architecture, exported to a temporary directory and loaded from disk with
      `export.load_teacher` (a TFSMLayer called inside the compiled step);
  (c) input: `data.Dataset.train` alone (decode, per-epoch shuffle, augmentation,
      batching), whole epochs, on the real data set.

(a) and (b) run on one fixed batch held in memory, so they time the model only.
Each figure is the median of `--reps` repetitions taken after `--warmup`
executions; (a) and (b) repetitions alternate, so a change in machine load hits
both. The last line is machine-readable:

  supervised_img_s=... distill_img_s=... input_img_s=... ratio=... peak_rss_mb=...

`ratio` is the distillation step time over the supervised step time (FLOPs
alone give about 4/3). `input_img_s` is `nan` for `--dataset=synthetic`.
"""

import contextlib
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

import ban_tf

FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """The training binary's flags plus the benchmark's own."""
  from ban_tf import main  # pylint: disable=g-import-not-at-top
  main.define_flags(fv)
  fv.set_default("dataset", "synthetic")
  fv.set_default("epochs", 200)
  d = main._Definer(fv)  # pylint: disable=protected-access
  d.DEFINE_integer("steps", 30, "[bench] Timed train steps per repetition.")
  d.DEFINE_integer("reps", 5, "[bench] Repetitions; the median is reported.")
  d.DEFINE_integer("warmup", 3, "[bench] Untimed executions before timing (tracing, caches).")
  d.DEFINE_integer("input_batches", 0, "[bench] Batches per input-pipeline repetition (0 = one epoch).")
  d.DEFINE_bool("mock_data", False, "[bench] Use tfds mock data (random pixels) for --dataset.")
  d.DEFINE_list("image_shape", ["32", "32", "3"], "[bench] Image shape for --dataset=synthetic.")
  d.DEFINE_integer("num_classes", 10, "[bench] Classes for --dataset=synthetic.")
  d.DEFINE_integer("inter_op_threads", 0, "[bench] tf.config.threading inter-op threads (0 = TF default).")
  d.DEFINE_integer("intra_op_threads", 0, "[bench] tf.config.threading intra-op threads (0 = TF default).")
  d.DEFINE_bool("keras_baseline", True, "[bench] Also time a plain Keras compile()/fit step of the student.")


def peak_rss_mb():
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_device():
  """One line: the device the steps run on and the thread settings."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    device = f"GPU x{len(gpus)} ({details.get('device_name', 'unknown')})"
  else:
    device = "CPU"
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  inter = tf.config.threading.get_inter_op_parallelism_threads()
  intra = tf.config.threading.get_intra_op_parallelism_threads()
  def show(n):
    return f"{n}" if n else f"auto({cores})"
  return (f"device={device} cpu_cores_available={cores} inter_op_threads={show(inter)} "
          f"intra_op_threads={show(intra)} onednn={ban_tf.onednn_enabled()} tf={tf.__version__}")


def _fixed_batch_iterator(model, x, y):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_tensors((x, y)).repeat()
  return iter(model.distribute_strategy.experimental_distribute_dataset(ds))


class StepTimer:
  """Runs a compiled Keras train function on one fixed in-memory batch."""

  def __init__(self, model, x, y):
    self.model = model
    self.iterator = _fixed_batch_iterator(model, x, y)
    model.make_train_function()
    self.spe = model.steps_per_execution

  def run(self, steps):
    """Runs >= `steps` steps (whole executions); returns (steps run, seconds)."""
    executions = max(1, -(-steps // self.spe))
    t0 = time.perf_counter()
    logs = None
    for _ in range(executions):
      logs = self.model.train_function(self.iterator)
    float(logs["loss"])  # waits for the last step
    return executions * self.spe, time.perf_counter() - t0


def _build_distiller(cfg, info, teacher, steps_per_epoch, seed):
  from ban_tf import distiller  # pylint: disable=g-import-not-at-top
  from ban_tf import models  # pylint: disable=g-import-not-at-top
  from ban_tf import train  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  student = models.build_model(cfg.arch, info.num_classes, info.image_shape, mean=info.mean, std=info.std,
                               dropout=cfg.dropout, name=f"student{seed}")
  objective = cfg.objective() if teacher is not None else {}
  # Logit objectives only: feature matching / shared stems are not what this bench times.
  model = distiller.Distiller(
      student, teacher, loss=objective.get("loss", "ban"), temperature=objective.get("temperature", 1.0),
      kd_weight=objective.get("kd_weight", 1.0), label_weight=objective.get("label_weight", 0.0),
      weight_decay=cfg.weight_decay, seed=seed, clip_norm=cfg.clip_norm)
  optimizer = train.make_optimizer(cfg, steps_per_epoch)
  model.compile(optimizer=optimizer, steps_per_execution=cfg.steps_per_execution,
                jit_compile=cfg.jit_compile)
  return model


def _build_keras_baseline(cfg, info, steps_per_epoch):
  """The student under plain `compile(loss=...)`: Keras' own train_step."""
  from ban_tf import models  # pylint: disable=g-import-not-at-top
  from ban_tf import train  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(cfg.seed)
  student = models.build_model(cfg.arch, info.num_classes, info.image_shape, mean=info.mean, std=info.std,
                               dropout=cfg.dropout, name="keras_baseline")
  student.compile(optimizer=train.make_optimizer(cfg, steps_per_epoch),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=cfg.steps_per_execution, jit_compile=cfg.jit_compile)
  return student


class _SyntheticInfo:
  def __init__(self, shape, num_classes):
    self.image_shape = tuple(shape)
    self.num_classes = num_classes
    self.mean = None
    self.std = None
    self.num_train = 50000
    self.name = "synthetic"


def _median_rate(samples, batch_size):
  """images/s of the median repetition (by time per step)."""
  per_step = statistics.median(t / n for n, t in samples)
  return batch_size / per_step


def time_input(dataset, cfg, reps, input_batches):
  """Median images/s of `dataset.train` over `reps` repetitions (after one warm-up epoch).

  Returns (images/s, construction seconds for cfg.epochs epochs, steps per epoch).
  """
  t0 = time.perf_counter()
  ds, steps = dataset.train(cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment,
                            epochs=cfg.epochs)
  build_s = time.perf_counter() - t0
  per_rep = input_batches or steps
  needed = 1 + -(-reps * per_rep // steps)  # warm-up epoch + the timed batches
  if needed > cfg.epochs:
    ds, _ = dataset.train(cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment, epochs=needed)
  it = iter(ds)
  for _ in range(steps):  # warm-up: one epoch fills the cache
    next(it)
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(per_rep):
      next(it)
    samples.append((per_rep, time.perf_counter() - t0))
  return _median_rate(samples, cfg.batch_size), build_s, steps


def run(cfg, steps, reps, warmup, input_batches=0, mock_data=False, image_shape=(32, 32, 3),
        num_classes=10, keras_baseline=True, out=sys.stdout):
  """Runs the benchmark; prints a report and returns the figures as a dict."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from ban_tf import data  # pylint: disable=g-import-not-at-top
  from ban_tf import export  # pylint: disable=g-import-not-at-top
  from ban_tf import main  # pylint: disable=g-import-not-at-top

  def say(*a):
    print(*a, file=out, flush=True)

  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING)  # tfds and SavedModel export log every file at INFO
  cfg.validate(num_replicas=max(cfg.num_cpu_devices, 1))
  strategy = main.make_strategy(cfg.num_cpu_devices)
  if cfg.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if cfg.mixed_precision == "bf16" else "mixed_float16")
  say(describe_device())
  say(f"arch={cfg.arch} batch_size={cfg.batch_size} steps={steps} reps={reps} warmup={warmup} "
      f"steps_per_execution={cfg.steps_per_execution} jit_compile={cfg.jit_compile} "
      f"mixed_precision={cfg.mixed_precision} replicas={strategy.num_replicas_in_sync} "
      f"weight_decay={cfg.weight_decay} loss={cfg.resolved_loss}")

  dataset = None
  mock = tfds_mock(num_examples=cfg.train_examples or 50000) if mock_data else contextlib.nullcontext()
  results = {}
  with mock:
    if cfg.dataset == "synthetic":
      info = _SyntheticInfo(image_shape, num_classes)
      rng = np.random.default_rng(cfg.seed)
      x = rng.uniform(0, 255, (cfg.batch_size,) + info.image_shape).astype(np.float32)
      y = rng.integers(0, num_classes, (cfg.batch_size,)).astype(np.int32)
      steps_per_epoch = 50000 // cfg.batch_size
    else:
      dataset = data.Dataset.from_config(cfg)
      info = dataset.info
      ds, steps_per_epoch = dataset.train(cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment)
      x, y = next(iter(ds))
    say(f"data={info.name}{' (tfds mock)' if mock_data else ''} image_shape={info.image_shape} "
        f"classes={info.num_classes}")

    tmp = tempfile.mkdtemp(prefix="ban_bench_")
    try:
      with strategy.scope():
        teacher_model = _build_distiller(cfg, info, None, steps_per_epoch, cfg.seed + 100).student
      export.export_saved_model(teacher_model, os.path.join(tmp, "teacher"), info.image_shape)
      teacher = export.load_teacher(os.path.join(tmp, "teacher"), strategy, expected_classes=info.num_classes)
      with strategy.scope():
        supervised = _build_distiller(cfg, info, None, steps_per_epoch, cfg.seed)
        distill = _build_distiller(cfg, info, teacher, steps_per_epoch, cfg.seed + 1)
        baseline = _build_keras_baseline(cfg, info, steps_per_epoch) if keras_baseline else None
      timers = {"supervised": StepTimer(supervised, x, y), "distill": StepTimer(distill, x, y)}
      if baseline is not None:
        timers["keras_fit"] = StepTimer(baseline, x, y)
      for name, timer in timers.items():
        t0 = time.perf_counter()
        timer.run(warmup * timer.spe)
        say(f"warm-up {name}: {time.perf_counter() - t0:.1f}s (includes tracing)")
      samples = {name: [] for name in timers}
      for _ in range(reps):  # interleaved, so load changes hit every variant
        for name, timer in timers.items():
          samples[name].append(timer.run(steps))
      for name, s in samples.items():
        rate = _median_rate(s, cfg.batch_size)
        results[f"{name}_img_s"] = rate
        spread = sorted(cfg.batch_size * n / t for n, t in s)
        say(f"{name:>10}: {rate:8.1f} img/s  {1000 * cfg.batch_size / rate:7.1f} ms/step  "
            f"(reps min..max {spread[0]:.1f}..{spread[-1]:.1f})")
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

    results["ratio"] = results["supervised_img_s"] / results["distill_img_s"]
    say(f"distill/supervised step time: {results['ratio']:.3f} (FLOPs alone: ~1.33)")
    if dataset is not None:
      rate, build_s, spe = time_input(dataset, cfg, reps, input_batches)
      results["input_img_s"] = rate
      say(f"     input: {rate:8.1f} img/s  ({rate / results['supervised_img_s']:.1f}x the supervised "
          f"step, {rate / results['distill_img_s']:.1f}x the distill step); pipeline of "
          f"{cfg.epochs} epochs x {spe} steps built in {build_s:.2f}s")
    else:
      results["input_img_s"] = float("nan")
      say("     input: not measured (--dataset=synthetic)")
  results["peak_rss_mb"] = peak_rss_mb()
  say(" ".join(f"{k}={results[k]:.{3 if k == 'ratio' else 1}f}"
               for k in ("supervised_img_s", "distill_img_s", "input_img_s", "ratio", "peak_rss_mb")))
  return results


@contextlib.contextmanager
def tfds_mock(num_examples):
  """tfds.testing.mock_data: random examples generated from the builder's features.

  Mock data needs no download, so data.py's offline probe is bypassed meanwhile.
  """
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from ban_tf import data  # pylint: disable=g-import-not-at-top
  with mock.patch.object(data, "_online", return_value=True), tfds.testing.mock_data(
      num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def main(argv):
  from ban_tf import errors  # pylint: disable=g-import-not-at-top
  from ban_tf import main as main_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    main_lib._fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")  # pylint: disable=protected-access
  try:
    cfg = main_lib.config_from_flags(FLAGS)
    if FLAGS.steps < 1 or FLAGS.reps < 1 or FLAGS.warmup < 0:
      raise errors.UsageError("--steps and --reps must be >= 1 and --warmup >= 0")
    shape = tuple(int(s) for s in FLAGS.image_shape)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    run(cfg, FLAGS.steps, FLAGS.reps, FLAGS.warmup, FLAGS.input_batches, FLAGS.mock_data, shape,
        FLAGS.num_classes, FLAGS.keras_baseline)
  except errors.UsageError as e:
    main_lib._fail(str(e))  # pylint: disable=protected-access


if __name__ == "__main__":
  define_flags()
  app.run(main)
