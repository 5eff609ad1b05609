"""Benchmark binary: images/s of a supervised step, a BAN step and the input pipeline.

  python -m ban_tf.bench --arch=preact-resnet-20 --batch_size=128 --steps=30
  python -m ban_tf.bench --dataset=fashion_mnist --data_dir=../shared/tensorflow_datasets
  python -m ban_tf.bench --dataset=cifar10 --mock_data --train_examples=50000  # tfds mock pixels
  python -m ban_tf.bench --whole_run --flagfile=flags/smoke.flags --data_dir=../shared/tensorflow_datasets

It measures, in one process and with the training binary's own flags (so
`--jit_compile`, `--steps_per_execution`, `--mixed_precision`, `--weight_decay`
... mean the same thing):

  (a) supervised: the Distiller with `teacher=None`, i.e. generation 0's step;
  (b) distill: the same Distiller taught by a SavedModel of the same
      architecture, exported to a temporary directory and loaded from disk with
      `teacher.Teacher.load` (its SavedModel endpoint called inside the compiled step);
  (c) input: `data.Dataset.train` alone (decode, per-epoch shuffle, batching, and
      per-example augmentation unless it runs in the step), whole epochs, on the
      real data set, both ways: `input_host_aug_img_s` (augmenting on the host) and
      `input_device_aug_img_s` (uint8 only: the host pipeline's ceiling when the
      step augments); `input_img_s` is the one `--device_augment` selects;
  (d) augment: `data.augment_batch` alone, compiled, on one batch: what
      `--device_augment` adds to every step;
  (e) input, uncached (`input_decode_img_s`): reading and decoding the stored
      images without the pipeline's in-memory cache (the first epoch; every epoch
      of a data set larger than memory): a JPEG folder's decode ceiling.

With `--device_augment` (the default) (a) and (b) include the in-step augmentation
of a uint8 batch, as in training.

(a) and (b) run on one fixed batch held in memory, so they time the model only.
Each figure is the median of `--reps` repetitions taken after `--warmup`
executions; (a) and (b) repetitions alternate, so a change in machine load hits
both. The last line is machine-readable:

  supervised_img_s=... distill_img_s=... input_img_s=... ratio=... peak_rss_mb=...
  input_host_aug_img_s=... input_device_aug_img_s=... augment_img_s=... input_decode_img_s=...

`ratio` is the distillation step time over the supervised step time (FLOPs
alone give about 4/3). The input figures are `nan` for `--dataset=synthetic`.

`--whole_run` instead runs the training binary itself (its flags, a temporary
run directory) and splits the wall time into phases (`whole_run`), ending with

  train_share=... total_s=... startup_s=... data_open_s=... pipeline_s=... teacher_load_s=...
  train_s=... eval_s=... checkpoint_tb_s=... export_s=... ensemble_s=... report_s=...
  other_s=... train_img_s=...
"""

import contextlib
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from unittest import mock

from absl import app
from absl import flags
from absl import logging
import numpy as np

import ban_tf
from ban_tf import errors
from ban_tf import main as main_lib
from ban_tf import tasks

FLAGS = flags.FLAGS


# The machine-readable last line of the step benchmark, in order.
RESULT_KEYS = (
  "supervised_img_s",
  "distill_img_s",
  "input_img_s",
  "ratio",
  "peak_rss_mb",
  "input_host_aug_img_s",
  "input_device_aug_img_s",
  "augment_img_s",
  "input_decode_img_s",
)


def define_flags(fv=FLAGS):
  """The training binary's flags plus the benchmark's own."""
  main_lib.define_flags(fv)
  fv.set_default("dataset", "synthetic")
  fv.set_default("epochs", 200)
  d = main_lib._Definer(fv)  # pylint: disable=protected-access
  d.DEFINE_integer("steps", 30, "[bench] Timed train steps per repetition.")
  d.DEFINE_integer("reps", 5, "[bench] Repetitions; the median is reported.")
  d.DEFINE_integer("warmup", 3, "[bench] Untimed executions before timing (tracing, caches).")
  d.DEFINE_integer(
    "input_batches", 0, "[bench] Batches per input-pipeline repetition (0 = one epoch)."
  )
  d.DEFINE_bool("mock_data", False, "[bench] Use tfds mock data (random pixels) for --dataset.")
  d.DEFINE_list("image_shape", ["32", "32", "3"], "[bench] Image shape for --dataset=synthetic.")
  d.DEFINE_integer("num_classes", 10, "[bench] Classes for --dataset=synthetic.")
  d.DEFINE_integer(
    "inter_op_threads", 0, "[bench] tf.config.threading inter-op threads (0 = TF default)."
  )
  d.DEFINE_integer(
    "intra_op_threads", 0, "[bench] tf.config.threading intra-op threads (0 = TF default)."
  )
  d.DEFINE_bool(
    "keras_baseline", True, "[bench] Also time a plain Keras compile()/fit step of the student."
  )
  d.DEFINE_string(
    "compare_precision",
    "",
    "[bench] bf16|fp16: also time the supervised and distill steps "
    "under that mixed policy (teacher exported under it too), interleaved with the others.",
  )
  d.DEFINE_bool(
    "whole_run",
    False,
    "[bench] Time a whole real run (the training binary's flags, in a "
    "temporary --run_dir) and split its wall time into phases, instead of the step benchmark.",
  )


def peak_rss_mb():
  """Peak resident set size of this process (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_device():
  """One line: the device the steps run on and the thread settings."""
  import tensorflow as tf  # lazy: TensorFlow; bench's flag errors come before it

  from ban_tf import tfdata  # lazy: TensorFlow; bench's flag errors come before it

  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    device = f"GPU x{len(gpus)} ({details.get('device_name', 'unknown')})"
  else:
    device = "CPU"
  cores = tfdata.usable_cores()
  inter = tf.config.threading.get_inter_op_parallelism_threads()
  intra = tf.config.threading.get_intra_op_parallelism_threads()

  def show(n):
    return f"{n}" if n else f"auto({cores})"

  return (
    f"device={device} cpu_cores_available={cores} inter_op_threads={show(inter)} "
    f"intra_op_threads={show(intra)} onednn={ban_tf.onednn_enabled()} tf={tf.__version__}"
  )


def _fixed_batch_iterator(model, batch):
  import tensorflow as tf  # lazy: TensorFlow; bench's flag errors come before it

  from ban_tf import tfdata  # lazy: TensorFlow; bench's flag errors come before it

  ds = tfdata.untuned(tf.data.Dataset.from_tensors(tuple(batch)).repeat())
  return iter(model.distribute_strategy.experimental_distribute_dataset(ds))


class StepTimer:
  """Runs a compiled Keras train function on one fixed in-memory batch.

  `batch` is (images, labels), or (uint8 images, labels, example indices) for a
  model that augments inside its step.
  """

  def __init__(self, model, batch):
    self.model = model
    self.iterator = _fixed_batch_iterator(model, batch)
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


def _build_distiller(cfg, dataset, teacher, steps_per_epoch, seed, augment=None):
  from ban_tf import distiller  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import losses  # lazy: TensorFlow; bench's flag errors come before it
  import keras  # lazy: TensorFlow; bench's flag errors come before it

  task = tasks.get(cfg.task)
  keras.utils.set_random_seed(seed)
  student = task.build_model(cfg.arch, dataset, dropout=cfg.dropout, name=f"student{seed}")
  objective = cfg.objective() if teacher is not None else losses.Objective.labels_only()
  # Logit objectives only: feature matching / shared stems are not what this bench times.
  model = distiller.Distiller(
    student,
    teacher,
    loss=objective.loss,
    temperature=objective.temperature,
    kd_weight=objective.kd_weight,
    label_weight=objective.label_weight,
    weight_decay=cfg.weight_decay,
    seed=seed,
    clip_norm=cfg.clip_norm,
    augment=augment,
  )
  optimizer = task.make_optimizer(cfg, steps_per_epoch)
  model.compile(
    optimizer=optimizer, steps_per_execution=cfg.steps_per_execution, jit_compile=cfg.jit_compile
  )
  return model


def _build_keras_baseline(cfg, dataset, steps_per_epoch):
  """The student under plain `compile(loss=...)`: Keras' own train_step."""
  import keras  # lazy: TensorFlow; bench's flag errors come before it

  task = tasks.get(cfg.task)
  keras.utils.set_random_seed(cfg.seed)
  student = task.build_model(cfg.arch, dataset, dropout=cfg.dropout, name="keras_baseline")
  student.compile(
    optimizer=task.make_optimizer(cfg, steps_per_epoch),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    steps_per_execution=cfg.steps_per_execution,
    jit_compile=cfg.jit_compile,
  )
  return student


class _SyntheticInfo:
  def __init__(self, shape, num_classes):
    self.image_shape = tuple(shape)
    self.num_classes = num_classes
    self.mean = None
    self.std = None
    self.num_train = 50000
    self.num_val = 0
    self.num_test = 0
    self.class_names = ()
    self.name = "synthetic"


class _Synthetic:
  """--dataset=synthetic: random pixels (an image data set's `info`, no pipelines)."""

  def __init__(self, shape, num_classes):
    self.info = _SyntheticInfo(shape, num_classes)


def _median_rate(samples, batch_size):
  """images/s of the median repetition (by time per step)."""
  per_step = statistics.median(t / n for n, t in samples)
  return batch_size / per_step


def time_input(dataset, cfg, reps, input_batches, device_augment=False):
  """Median images/s of `dataset.train` over `reps` repetitions (after one warm-up epoch).

  With `device_augment` the pipeline only reads, shuffles and batches uint8 (its
  augmentation runs in the train step); otherwise it augments every example.
  Returns (images/s, construction seconds for cfg.epochs epochs, steps per epoch).
  """
  kw = {"device_augment": True} if device_augment else {}
  t0 = time.perf_counter()
  ds, steps = dataset.train(
    cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment, epochs=cfg.epochs, **kw
  )
  build_s = time.perf_counter() - t0
  per_rep = input_batches or steps
  needed = 1 + -(-reps * per_rep // steps)  # warm-up epoch + the timed batches
  if needed > cfg.epochs:
    ds, _ = dataset.train(
      cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment, epochs=needed, **kw
    )
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


def time_decode(dataset, cfg, reps, input_batches):
  """Median images/s of reading and decoding the training images, uncached and batched
  (`data.Dataset.train_source`): the host's ceiling when nothing is cached (image folders
  of JPEGs: file reads and JPEG decoding, plus the resize to --image_size)."""
  per_rep = input_batches or dataset.steps_per_epoch(cfg.batch_size)
  from ban_tf import tfdata  # lazy: TensorFlow; bench's flag errors come before it

  ds = tfdata.untuned(dataset.train_source().repeat().batch(cfg.batch_size).prefetch(2))
  it = iter(ds)  # as training reads it: no autotuning
  next(it)  # warm-up: threads and the first files
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(per_rep):
      next(it)
    samples.append((per_rep, time.perf_counter() - t0))
  return _median_rate(samples, cfg.batch_size)


def time_augment(images, indices, seed, mode, reps, steps):
  """Median images/s of `data.augment_batch` alone, compiled, on one batch (in-step cost)."""
  import tensorflow as tf  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import data  # lazy: TensorFlow; bench's flag errors come before it

  fn = tf.function(lambda x, i: tf.reduce_sum(data.augment_batch(x, i, seed, mode)))
  images, indices = tf.constant(images), tf.constant(indices)
  float(fn(images, indices))  # trace
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn(images, indices)
    float(out)
    samples.append((steps, time.perf_counter() - t0))
  return _median_rate(samples, int(images.shape[0]))


def run(
  cfg,
  steps,
  reps,
  warmup,
  input_batches=0,
  mock_data=False,
  image_shape=(32, 32, 3),
  num_classes=10,
  keras_baseline=True,
  compare_precision="",
  out=sys.stdout,
):
  """Runs the benchmark; prints a report and returns the figures as a dict."""
  import keras  # lazy: TensorFlow; bench's flag errors come before it
  import tensorflow as tf  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import data  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import export  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import teacher as teacher_lib  # lazy: TensorFlow; bench's flag errors come before it

  def say(*a):
    print(*a, file=out, flush=True)

  tf.get_logger().setLevel("ERROR")
  logging.set_verbosity(logging.WARNING)  # tfds and SavedModel export log every file at INFO
  cfg.validate(num_replicas=max(cfg.num_cpu_devices, 1))
  strategy = main_lib.make_strategy(cfg.num_cpu_devices)
  if cfg.mixed_precision != "none":
    keras.mixed_precision.set_global_policy(
      "mixed_bfloat16" if cfg.mixed_precision == "bf16" else "mixed_float16"
    )
  say(describe_device())
  say(
    f"arch={cfg.arch} batch_size={cfg.batch_size} steps={steps} reps={reps} warmup={warmup} "
    f"steps_per_execution={cfg.steps_per_execution} jit_compile={cfg.jit_compile} "
    f"mixed_precision={cfg.mixed_precision} replicas={strategy.num_replicas_in_sync} "
    f"weight_decay={cfg.weight_decay} loss={cfg.resolved_loss} augment={cfg.resolved_augment} "
    f"device_augment={cfg.resolved_device_augment}"
  )

  dataset = None
  mock = (
    tfds_mock(num_examples=cfg.train_examples or 50000) if mock_data else contextlib.nullcontext()
  )
  results = {}
  with mock:
    if cfg.dataset == "synthetic":
      source = _Synthetic(image_shape, num_classes)
      info = source.info
      rng = np.random.default_rng(cfg.seed)
      x = rng.integers(0, 256, (cfg.batch_size,) + info.image_shape).astype(np.uint8)
      y = rng.integers(0, num_classes, (cfg.batch_size,)).astype(np.int32)
      idx = data.augment_keys(
        cfg.seed, np.arange(cfg.batch_size), cfg.resolved_augment, info.image_shape[:2]
      ).numpy()
      steps_per_epoch = 50000 // cfg.batch_size
    else:
      dataset = source = data.Dataset.from_config(cfg)
      info = dataset.info
      ds, steps_per_epoch = dataset.train(
        cfg.batch_size, seed=cfg.seed, augment=cfg.resolved_augment, device_augment=True
      )
      x, y, idx = (t.numpy() for t in next(iter(ds)))
    on_device = cfg.resolved_device_augment
    # The timed steps see what training sees: uint8 pixels augmented in the step, or
    # the host's augmented float32 pixels.
    batch = (
      (x, y, idx) if on_device else (data.augment_batch(x, idx, cfg.seed, cfg.resolved_augment), y)
    )
    augment = (
      (lambda im, i: data.augment_batch(im, i, cfg.seed, cfg.resolved_augment))
      if on_device
      else None
    )
    say(
      f"data={info.name}{' (tfds mock)' if mock_data else ''} image_shape={info.image_shape} "
      f"classes={info.num_classes}"
    )

    tmp = tempfile.mkdtemp(prefix="ban_bench_")
    try:
      with strategy.scope():
        teacher_model = _build_distiller(cfg, source, None, steps_per_epoch, cfg.seed + 100).student
      spec = tasks.get(cfg.task).spec(source)
      export.export_saved_model(
        teacher_model, os.path.join(tmp, "teacher"), spec.input_shape, spec=spec
      )
      teacher = teacher_lib.Teacher.load(
        os.path.join(tmp, "teacher"), strategy, expected_classes=spec.num_outputs
      )
      with strategy.scope():
        supervised = _build_distiller(cfg, source, None, steps_per_epoch, cfg.seed, augment)
        distill = _build_distiller(cfg, source, teacher, steps_per_epoch, cfg.seed + 1, augment)
        baseline = _build_keras_baseline(cfg, source, steps_per_epoch) if keras_baseline else None
      timers = {"supervised": StepTimer(supervised, batch), "distill": StepTimer(distill, batch)}
      if baseline is not None:  # Keras' own step: host-augmented float32 pixels
        timers["keras_fit"] = StepTimer(
          baseline, (data.augment_batch(x, idx, cfg.seed, cfg.resolved_augment), y)
        )
      if compare_precision:  # the same steps under a mixed policy, teacher exported under it
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(
          "mixed_bfloat16" if compare_precision == "bf16" else "mixed_float16"
        )
        try:
          with strategy.scope():
            low_teacher = _build_distiller(
              cfg, source, None, steps_per_epoch, cfg.seed + 100
            ).student
          low_teacher.set_weights(teacher_model.get_weights())
          export.export_saved_model(low_teacher, os.path.join(tmp, "teacher_low"), info.image_shape)
          low = teacher_lib.Teacher.load(
            os.path.join(tmp, "teacher_low"), strategy, expected_classes=info.num_classes
          )
          with strategy.scope():
            sup_low = _build_distiller(cfg, source, None, steps_per_epoch, cfg.seed, augment)
            dis_low = _build_distiller(cfg, source, low, steps_per_epoch, cfg.seed + 1, augment)
          timers[f"supervised_{compare_precision}"] = StepTimer(sup_low, batch)
          timers[f"distill_{compare_precision}"] = StepTimer(dis_low, batch)
          say(f"teachers compute in {teacher.compute_dtype_found} and {low.compute_dtype_found}")
          for name in (f"supervised_{compare_precision}", f"distill_{compare_precision}"):
            timers[name].run(0)  # traced under the policy it was built with
        finally:
          keras.mixed_precision.set_global_policy(policy)
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
        say(
          f"{name:>15}: {rate:8.1f} img/s  {1000 * cfg.batch_size / rate:7.1f} ms/step  "
          f"(reps min..max {spread[0]:.1f}..{spread[-1]:.1f})"
        )
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

    results["ratio"] = results["supervised_img_s"] / results["distill_img_s"]
    say(f"distill/supervised step time: {results['ratio']:.3f} (FLOPs alone: ~1.33)")
    results["augment_img_s"] = time_augment(x, idx, cfg.seed, cfg.resolved_augment, reps, steps)
    say(
      f"   augment: {results['augment_img_s']:8.1f} img/s  (data.augment_batch alone, compiled: the "
      f"in-step cost of --device_augment, {cfg.resolved_augment})"
    )
    if dataset is not None:
      for where in ("device", "host"):
        rate, build_s, spe = time_input(
          dataset, cfg, reps, input_batches, device_augment=where == "device"
        )
        results[f"input_{where}_aug_img_s"] = rate
        say(
          f"{'input, ' + where + ' aug':>19}: {rate:8.1f} img/s  ({rate / results['supervised_img_s']:.1f}x "
          f"the supervised step, {rate / results['distill_img_s']:.1f}x the distill step); pipeline of "
          f"{cfg.epochs} epochs x {spe} steps built in {build_s:.2f}s"
        )
      results["input_img_s"] = results[
        "input_device_aug_img_s" if on_device else "input_host_aug_img_s"
      ]
      results["input_decode_img_s"] = time_decode(dataset, cfg, reps, input_batches)
      say(
        f"{'input, uncached':>19}: {results['input_decode_img_s']:8.1f} img/s  (reading and "
        "decoding the stored images, no cache: the first epoch, or every epoch of a data set "
        "larger than memory)"
      )
    else:
      results["input_img_s"] = results["input_device_aug_img_s"] = results[
        "input_host_aug_img_s"
      ] = results["input_decode_img_s"] = float("nan")
      say("     input: not measured (--dataset=synthetic)")
  results["peak_rss_mb"] = peak_rss_mb()
  keys = RESULT_KEYS
  if compare_precision:
    for kind in ("supervised", "distill"):
      results[f"{kind}_{compare_precision}_speedup"] = (
        results[f"{kind}_{compare_precision}_img_s"] / results[f"{kind}_img_s"]
      )
      say(
        f"{kind} step, {compare_precision} vs {cfg.mixed_precision}: "
        f"{results[f'{kind}_{compare_precision}_speedup']:.3f}x (medians, interleaved)"
      )
    keys += tuple(
      f"{k}_{compare_precision}_{s}"
      for s in ("img_s", "speedup")
      for k in ("supervised", "distill")
    )
  say(
    " ".join(
      f"{k}={results[k]:.{3 if k == 'ratio' or k.endswith('speedup') else 1}f}" for k in keys
    )
  )
  return results


def process_age_s():
  """Seconds since this process started (Linux /proc; 0.0 where unavailable)."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
  except (OSError, ValueError, IndexError):
    return 0.0


class PhaseClock:
  """Exclusive wall time per phase: time spent in a nested phase counts only there.

  `wrap(owner, attr, phase)` returns a mock.patch.object context that times every
  call of owner.attr as `phase`.
  """

  def __init__(self):
    self.seconds = {}
    self.calls = {}
    self._stack = []  # [phase, start of its current exclusive stretch]

  @contextlib.contextmanager
  def phase(self, name):
    now = time.perf_counter()
    if self._stack:
      outer = self._stack[-1]
      self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
    self._stack.append([name, now])
    try:
      yield
    finally:
      end = time.perf_counter()
      inner = self._stack.pop()
      self.seconds[name] = self.seconds.get(name, 0.0) + end - inner[1]
      self.calls[name] = self.calls.get(name, 0) + 1
      if self._stack:
        self._stack[-1][1] = end

  @contextlib.contextmanager
  def wrap(self, owner, attr, name, before=None):
    """Times every call of owner.attr as `name` (calling `before(*args)` first) meanwhile."""
    original = getattr(owner, attr)

    def timed(*args, **kwargs):
      if before is not None:
        before(*args)
      with self.phase(name):
        return original(*args, **kwargs)

    with mock.patch.object(owner, attr, timed):
      yield


# Phases of --whole_run, in report order; "other" is what none of them covers (strategy
# and model construction, run-directory bookkeeping, results tables).
WHOLE_RUN_PHASES = (
  "startup",
  "data_open",
  "pipeline",
  "teacher_load",
  "train",
  "eval",
  "checkpoint_tb",
  "export",
  "ensemble",
  "report",
  "other",
)


def whole_run(cfg, out=sys.stdout):
  """Runs `main.run(cfg)` in a temporary run directory and splits its wall time.

  Phases: startup (process start to here: interpreter, TensorFlow and Keras
  imports), data_open (tfds builder, split counts, channel statistics), pipeline
  (building the epoch pipelines), teacher_load (SavedModel load and
  fingerprint check: teacher.Teacher.load), train (Keras fit minus what is below: the training steps, including
  tracing, and the input waits), eval (validation each epoch, final test/val),
  checkpoint_tb (history.json, TensorBoard scalars and the epoch checkpoint),
  export (SavedModel with fingerprint, model.keras), ensemble (BANE loading and
  building, and its evaluation unless that goes through Distiller.evaluate: then eval),
  report (report.png, hparams), other. Returns the figures as a dict and ends with
  one machine-readable line.
  """
  from ban_tf import data  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import distiller  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import export  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import teacher as teacher_lib  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import generations  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import report  # lazy: TensorFlow; bench's flag errors come before it
  from ban_tf import train  # lazy: TensorFlow; bench's flag errors come before it

  startup = process_age_s()
  t0 = time.perf_counter()
  clock = PhaseClock()
  images = {"n": 0}

  def count_epoch(callback, *unused):  # one trained epoch: steps x global batch images
    images["n"] += int(callback.params.get("steps") or 0) * cfg.batch_size

  tmp = tempfile.mkdtemp(prefix="ban_whole_run_")
  cfg = dataclasses.replace(cfg, run_dir=os.path.join(tmp, "run"), overwrite=True)
  logging.set_verbosity(logging.WARNING)
  patches = [
    clock.wrap(data.Dataset, "__init__", "data_open"),
    clock.wrap(data.Dataset, "train", "pipeline"),
    clock.wrap(teacher_lib.Teacher, "load", "teacher_load"),
    clock.wrap(distiller.Distiller, "fit", "train"),
    clock.wrap(distiller.Distiller, "evaluate", "eval"),
    clock.wrap(train.EpochState, "on_epoch_end", "checkpoint_tb", before=count_epoch),
    clock.wrap(export, "export_saved_model", "export"),
    clock.wrap(export, "save_keras", "export"),
    clock.wrap(generations, "evaluate_ensemble", "ensemble"),
    clock.wrap(report, "write_report", "report"),
  ]
  try:
    with contextlib.ExitStack() as stack:
      for p in patches:
        stack.enter_context(p)
      with contextlib.redirect_stdout(sys.stderr):  # the results table is not the report
        main_lib.run(cfg)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  run_s = time.perf_counter() - t0
  s = {k: clock.seconds.get(k, 0.0) for k in WHOLE_RUN_PHASES}
  s["startup"] = startup
  s["other"] = max(0.0, run_s - sum(v for k, v in s.items() if k not in ("startup", "other")))
  total = startup + run_s
  res = {f"{k}_s": v for k, v in s.items()}
  res["total_s"] = total
  res["train_share"] = s["train"] / total
  res["train_img_s"] = images["n"] / s["train"] if s["train"] else float("nan")
  print(
    f"whole run: {cfg.dataset} {cfg.arch} gens={cfg.gens} epochs={cfg.epochs} batch={cfg.batch_size} "
    f"device_augment={cfg.resolved_device_augment}; {images['n']} training images",
    file=out,
  )
  for k in WHOLE_RUN_PHASES:
    print(f"{k:>14}: {s[k]:7.2f} s  {100 * s[k] / total:5.1f}%", file=out)
  print(f"{'total':>14}: {total:7.2f} s", file=out)
  print(
    " ".join(
      [f"train_share={res['train_share']:.3f}", f"total_s={total:.2f}"]
      + [f"{k}_s={s[k]:.2f}" for k in WHOLE_RUN_PHASES]
      + [f"train_img_s={res['train_img_s']:.1f}"]
    ),
    file=out,
    flush=True,
  )
  return res


@contextlib.contextmanager
def tfds_mock(num_examples):
  """tfds.testing.mock_data: random examples generated from the builder's features.

  Mock data needs no download, so data.py's offline probe is bypassed meanwhile.
  """
  import tensorflow_datasets as tfds  # lazy: tfds; bench's flag errors come before it
  from ban_tf import data  # lazy: TensorFlow; bench's flag errors come before it

  with (
    mock.patch.object(data, "_online", return_value=True),
    tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE),
  ):
    yield


def main(argv):
  if len(argv) > 1:
    main_lib._fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")  # pylint: disable=protected-access
  try:
    cfg = main_lib.config_from_flags(FLAGS)
    if FLAGS.steps < 1 or FLAGS.reps < 1 or FLAGS.warmup < 0:
      raise errors.UsageError("--steps and --reps must be >= 1 and --warmup >= 0")
    shape = tuple(int(s) for s in FLAGS.image_shape)
    import tensorflow as tf  # lazy: TensorFlow, once the flags above are checked

    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
    if FLAGS.whole_run:
      whole_run(cfg)
      return
    if FLAGS.compare_precision not in ("", "bf16", "fp16"):
      raise errors.UsageError(
        f"--compare_precision={FLAGS.compare_precision!r}: use bf16 or fp16 (or leave it empty)"
      )
    run(
      cfg,
      FLAGS.steps,
      FLAGS.reps,
      FLAGS.warmup,
      FLAGS.input_batches,
      FLAGS.mock_data,
      shape,
      FLAGS.num_classes,
      FLAGS.keras_baseline,
      FLAGS.compare_precision,
    )
  except errors.UsageError as e:
    main_lib._fail(str(e))  # pylint: disable=protected-access


if __name__ == "__main__":
  define_flags()
  app.run(main)
