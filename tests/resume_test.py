"""Kill-and-resume tests of the ban_tf binary (issue 5, docs/reliability.md).

One run directory is killed with SIGKILL three times, then finished:
  (b) between generations: right after gen_0/DONE (fault kill_between_generations);
  (a) during generation 1's training: killed from outside once gen_1/ckpt holds a
      checkpoint (a real, asynchronous SIGKILL);
  (c) during generation 1's export: after the SavedModel's temporary directory is
      complete, before its rename (fault kill_during_export).
Each rerun is the same command. Generation 0 must never be retrained, and with
--deterministic every metric must equal that of an uninterrupted run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import IMAGE_ARGS
from tests.conftest import REPO
from tests.conftest import SHARED_TFDS
from tests.conftest import run_main_once

# The shared tiny run (256 test images, --deterministic) with 2 epochs, a student, dropout
# (its RNG state must resume too) and the log lines the test reads.
ARGS = IMAGE_ARGS + ["--epochs=2", "--gens=1", "--dropout=0.2", "--verbose=2"]
TEST_SPLIT = next(a for a in IMAGE_ARGS if a.startswith("--test_split=")).split("=", 1)[1]


def _cmd(run_dir):
  return [sys.executable, "-m", "ban_tf.main", *ARGS, f"--run_dir={run_dir}"]


def _env(fault=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("BAN_TF_FAULT", None)
  if fault:
    env["BAN_TF_FAULT"] = fault
  return env


def _run(run_dir, fault=None):
  return subprocess.run(
    _cmd(run_dir), cwd=REPO, env=_env(fault), capture_output=True, text=True, timeout=600
  )


def _load(run_dir, rel, drop=("seconds",)):
  """A JSON output with its wall-clock fields removed and the run_dir as <run>."""

  def clean(x):
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items() if k not in drop}
    if isinstance(x, list):
      return [clean(v) for v in x]
    return x

  with open(os.path.join(run_dir, rel)) as f:
    return clean(json.loads(f.read().replace(os.path.abspath(run_dir), "<run>")))


def _mtimes(gen_dir):
  return {
    p: os.stat(os.path.join(gen_dir, p)).st_mtime_ns
    for p in ("DONE", "metrics.json", "model.keras", "saved_model/saved_model.pb")
  }


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """The uninterrupted run, main() in this process (the killed ones are processes of their own)."""
  run_dir = str(tmp_path_factory.mktemp("baseline") / "run")
  assert run_main_once(ARGS + [f"--run_dir={run_dir}"]) == 0
  return run_dir


def test_checkpoint_restores_optimizer_epoch_schedule_and_dropout_rng(tmp_path):
  """The checkpoint layout of train.train_generation restores what resume needs."""
  import keras  # pylint: disable=g-import-not-at-top
  from ban_tf import config, models, train  # pylint: disable=g-import-not-at-top

  cfg = config.Config(epochs=4, lr=0.1, lr_milestones=(0.5,), lr_decay=0.1)

  def build():
    keras.utils.set_random_seed(3)
    student = models.build_model("tiny", 10, (28, 28, 1), dropout=0.3)
    opt = train.make_optimizer(cfg, steps_per_epoch=2)
    student.compile(
      optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    opt.build(student.trainable_variables)
    epoch = tf.Variable(0, dtype=tf.int64)
    ckpt = train.make_checkpoint(student, opt, epoch)
    return student, opt, epoch, ckpt

  x = np.random.RandomState(0).uniform(0, 255, (16, 28, 28, 1)).astype(np.float32)
  y = np.arange(16) % 10
  student, opt, epoch, ckpt = build()
  student.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)  # 6 steps: past the milestone
  epoch.assign(3)
  path = ckpt.save(str(tmp_path / "ckpt"))
  student2, opt2, epoch2, ckpt2 = build()
  ckpt2.restore(path).assert_existing_objects_matched()
  assert int(epoch2.numpy()) == 3
  assert int(opt2.iterations.numpy()) == 6
  assert float(opt2.learning_rate.numpy()) == pytest.approx(0.01)  # schedule: decayed after step 4
  slots = [v for v in opt2.variables if "momentum" in v.path]
  assert slots and all(np.any(v.numpy() != 0) for v in slots)
  for a, b in zip(opt.variables, opt2.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  for a, b in zip(
    student.variables, student2.variables
  ):  # includes the dropout SeedGenerator state
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Continuing both gives the same weights: dropout masks and momentum match.
  student.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
  student2.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
  for a, b in zip(student.weights, student2.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.slow
def test_killed_three_times_then_resumed_equals_uninterrupted(baseline, tmp_path):
  run_dir = str(tmp_path / "run")
  gen0, gen1 = os.path.join(run_dir, "gen_0"), os.path.join(run_dir, "gen_1")

  # (b) Killed between generations: gen 0 is DONE, gen 1 not started.
  proc = _run(run_dir, fault="kill_between_generations@gen_0")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert os.path.exists(os.path.join(gen0, "DONE"))
  assert not os.path.exists(gen1)
  gen0_files = _mtimes(gen0)

  # (a) Killed from outside during generation 1's training, once it has a checkpoint.
  p = subprocess.Popen(
    _cmd(run_dir),
    cwd=REPO,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  index = os.path.join(gen1, "ckpt", "checkpoint")
  deadline = time.time() + 300
  while not os.path.exists(index) and p.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  os.kill(p.pid, signal.SIGKILL)
  stderr = p.communicate()[1]
  assert p.returncode == -signal.SIGKILL, stderr[-3000:]
  assert "gen 0 already done: skipping" in stderr
  assert not os.path.exists(os.path.join(gen1, "DONE")), "gen 1 finished before the kill"

  # (c) Killed during generation 1's export, with its SavedModel half in place.
  proc = _run(run_dir, fault="kill_during_export@gen_1")
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  resumed = re.search(r"gen 1: resuming from epoch (\d+)", proc.stderr)
  assert resumed and 1 <= int(resumed.group(1)) <= 2, proc.stderr[-3000:]
  assert any(n.startswith(".tmp-") for n in os.listdir(gen1))
  assert not os.path.exists(os.path.join(gen1, "saved_model"))
  assert not os.path.exists(os.path.join(gen1, "DONE"))

  # Rerun: resumes at the last epoch, only evaluates and exports, and finishes.
  proc = _run(run_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "gen 0 already done: skipping" in proc.stderr
  assert "gen 1: resuming from epoch 2" in proc.stderr
  assert "Epoch " not in proc.stdout + proc.stderr  # nothing was trained
  assert _mtimes(gen0) == gen0_files  # gen 0 was neither retrained nor rewritten
  leftovers = [
    os.path.join(d, n) for d, ds, fs in os.walk(run_dir) for n in ds + fs if n.startswith(".tmp-")
  ]
  assert not leftovers
  assert not os.path.exists(os.path.join(gen1, "ckpt"))

  # Bit-identical to the uninterrupted run (--deterministic), wall-clock fields aside.
  for rel in (
    "results.json",
    "gen_0/metrics.json",
    "gen_1/metrics.json",
    "gen_0/history.json",
    "gen_1/history.json",
  ):
    assert _load(run_dir, rel) == _load(baseline, rel), rel
  fp = [
    np.load(os.path.join(d, "gen_1", "saved_model", "fingerprint.npz"))["outputs"]
    for d in (run_dir, baseline)
  ]
  np.testing.assert_array_equal(fp[0], fp[1])


@pytest.mark.slow
def test_resume_builds_the_input_pipeline_once_from_the_restored_epoch(tmp_path, monkeypatch):
  """Resuming builds the (per-epoch shuffled) training pipeline once, from the next epoch."""
  from ban_tf import config, data, export, train  # pylint: disable=g-import-not-at-top

  ds = data.Dataset("fashion_mnist", SHARED_TFDS, train_examples=64, test_split=TEST_SPLIT)
  calls = []
  real_train = ds.train
  monkeypatch.setattr(ds, "train", lambda *a, **kw: calls.append(kw) or real_train(*a, **kw))
  gen_dir = str(tmp_path / "gen_0")

  def interrupted_export(*args, **kwargs):
    raise KeyboardInterrupt("stop after training")

  with monkeypatch.context() as m:  # train one epoch, then stop before the export
    m.setattr(export, "export_saved_model", interrupted_export)
    with pytest.raises(KeyboardInterrupt):
      train.train_generation(
        config.Config(arch="tiny", batch_size=32, epochs=1),
        0,
        tf.distribute.get_strategy(),
        ds,
        gen_dir,
      )
  assert [c["first_epoch"] for c in calls] == [0]
  calls.clear()
  result = train.train_generation(
    config.Config(arch="tiny", batch_size=32, epochs=2),
    0,
    tf.distribute.get_strategy(),
    ds,
    gen_dir,
  )
  assert [(c["first_epoch"], c["epochs"]) for c in calls] == [(1, 2)]
  assert result["epochs"] == 2 and os.path.exists(os.path.join(gen_dir, "DONE"))


@pytest.mark.slow
def test_final_val_figures_are_the_last_epochs_validation_live_and_resumed(tmp_path, monkeypatch):
  """The final val figures reuse the last epoch's validation (no second pass), live and after a
  resume past the last checkpoint, and equal a fresh evaluation of the saved model."""
  import keras  # pylint: disable=g-import-not-at-top
  from ban_tf import config, data, distiller, export, train  # pylint: disable=g-import-not-at-top

  ds = data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_examples=64, val_examples=48, test_split=TEST_SPLIT
  )
  cfg = config.Config(arch="tiny", batch_size=32, epochs=2)
  passes = []
  real_evaluate = distiller.Distiller.evaluate

  def counted(self, *args, **kwargs):
    passes.append(1)
    return real_evaluate(self, *args, **kwargs)

  monkeypatch.setattr(distiller.Distiller, "evaluate", counted)

  def fresh_val(gen_dir):
    student = keras.saving.load_model(os.path.join(gen_dir, "model.keras"), compile=False)
    scorer = distiller.Distiller(student)
    scorer.compile()
    return real_evaluate(scorer, ds.val(32), verbose=0, return_dict=True)

  live_dir = str(tmp_path / "live")
  live = train.train_generation(cfg, 0, tf.distribute.get_strategy(), ds, live_dir)
  assert len(passes) == 2 + 1  # one validation per epoch inside fit, then the test split only
  want = fresh_val(live_dir)
  np.testing.assert_allclose(
    [live["val_loss"], live["val_accuracy"]],
    [want["label_loss"], want["accuracy"]],
    rtol=1e-6,
    atol=1e-7,
  )
  last = json.load(open(os.path.join(live_dir, "history.json")))[-1]
  assert (live["val_loss"], live["val_accuracy"]) == (last["val_label_loss"], last["val_accuracy"])

  resumed_dir = str(tmp_path / "resumed")
  with monkeypatch.context() as m:  # both epochs checkpointed, then stopped before the export

    def interrupted_export(*args, **kwargs):
      raise KeyboardInterrupt("stop after training")

    m.setattr(export, "export_saved_model", interrupted_export)
    with pytest.raises(KeyboardInterrupt):
      train.train_generation(cfg, 0, tf.distribute.get_strategy(), ds, resumed_dir)
  passes.clear()
  resumed = train.train_generation(cfg, 0, tf.distribute.get_strategy(), ds, resumed_dir)
  assert len(passes) == 1  # nothing left to train: the test split only, val from history.json
  want = fresh_val(resumed_dir)
  np.testing.assert_allclose(
    [resumed["val_loss"], resumed["val_accuracy"]],
    [want["label_loss"], want["accuracy"]],
    rtol=1e-6,
    atol=1e-7,
  )


def test_no_lr_milestone_falls_before_the_first_epoch():
  """--epochs=1: the default milestone 0.3 rounds to epoch 0; the first epoch still trains at --lr.

  --epochs=2: 0.3, 0.6, 0.8 -> epochs 1, 1, 2 (two decays after the first epoch, the third after the run).
  """
  from ban_tf import config, train  # pylint: disable=g-import-not-at-top

  sched = train.make_optimizer(config.Config(epochs=1, lr=0.05), steps_per_epoch=12).learning_rate
  opt2 = train.make_optimizer(config.Config(epochs=2, lr=0.05), steps_per_epoch=12)
  sched2 = opt2._learning_rate  # pylint: disable=protected-access  (the schedule itself)
  assert float(sched) == pytest.approx(0.05)
  assert [float(sched2(s)) for s in (0, 11, 12, 24)] == pytest.approx([0.05, 0.05, 0.002, 0.0004])
