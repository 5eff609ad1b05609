"""What the binary prints and logs (issue 15): learning rates, TensorBoard points, Ctrl-C/SIGTERM, console.

In-process runs call main.main with their own FlagValues (as errors_test does); one
subprocess test runs the real binary for what only a fresh process shows (TensorFlow's
start-up noise, SIGTERM's exit status).
"""

import logging
import os
import signal
import subprocess
import sys

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator as ea

from ban_tf import console
from ban_tf import export
from absl import flags

from ban_tf import main
from tests.conftest import REPO
from tests.conftest import run_main
from tests.conftest import SHARED_TFDS

BASE = [
  f"--data_dir={SHARED_TFDS}",
  "--dataset=fashion_mnist",
  "--arch=tiny",
  "--train_examples=256",
  "--test_split=test[:256]",  # a console, not accuracy: 256 test images, not 10,000
  "--batch_size=32",
  "--epochs=1",
  "--gens=0",
  "--verbose=0",
]


def _main(monkeypatch, capsys, argv):
  """Runs the binary's main() in-process; returns (exit code, stderr)."""
  code, _, err = run_main(monkeypatch, capsys, argv)
  return code, err


def _scalars(logdir):
  """{tag: [(step, value), ...]} of every scalar in logdir's event files, duplicates kept."""
  acc = ea.EventAccumulator(logdir, size_guidance={ea.TENSORS: 0})
  acc.Reload()
  return {
    tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    for tag in acc.Tags()["tensors"]
    if not tag.startswith("_hparams_")
  }


@pytest.mark.slow
def test_logged_learning_rate_is_the_one_each_epoch_used(monkeypatch, capsys, tmp_path):
  """--epochs=3 --lr=0.1, milestones 0.3,0.6,0.8 -> boundaries after epochs 1, 2, 2: 0.1, 0.02, 0.0008."""
  run_dir = str(tmp_path / "run")
  code, err = _main(monkeypatch, capsys, BASE + [f"--run_dir={run_dir}", "--epochs=3", "--lr=0.1"])
  assert code == 0, err
  gen0 = os.path.join(run_dir, "gen_0")
  history = export.read_json(os.path.join(gen0, "history.json"))
  assert [h["learning_rate"] for h in history] == pytest.approx([0.1, 0.02, 0.0008])
  scalars = _scalars(os.path.join(run_dir, "tb", "Teacher"))
  assert [v for _, v in scalars["train/learning_rate"]] == pytest.approx([0.1, 0.02, 0.0008])
  # The teacher has no KD term: no all-zero kd_loss line in TensorBoard (history.json keeps it).
  assert "train/kd_loss" not in scalars and "train/label_loss" in scalars
  assert all(h["kd_loss"] == 0 for h in history)


@pytest.mark.slow
def test_resumed_run_writes_each_tensorboard_point_once(monkeypatch, capsys, caplog, tmp_path):
  """Stopped between epoch 2's TensorBoard write and its checkpoint, then rerun."""
  run_dir = str(tmp_path / "run")
  argv = BASE + [f"--run_dir={run_dir}", "--epochs=3"]
  monkeypatch.setenv("BAN_TF_FAULT", "enospc@gen_0/epoch_2")
  code, _ = _main(monkeypatch, capsys, argv)
  assert code == 2
  tb = os.path.join(run_dir, "tb", "Teacher")
  assert [s for s, _ in _scalars(tb)["train/loss"]] == [1, 2]  # epoch 2 written, not checkpointed
  monkeypatch.delenv("BAN_TF_FAULT")
  with caplog.at_level(logging.INFO, logger="absl"):
    code, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "gen 0: resuming from epoch 1" in caplog.text
  history = export.read_json(os.path.join(run_dir, "gen_0", "history.json"))
  for tag, points in _scalars(tb).items():
    steps = [s for s, _ in points]
    want = [3] if tag.startswith("test/") else [1, 2, 3]
    assert steps == want, (tag, points)  # each (tag, step) once
  loss = [v for _, v in _scalars(tb)["train/loss"]]
  assert loss == pytest.approx(
    [h["loss"] for h in history]
  )  # the resumed epoch 2, not the lost one


@pytest.mark.parametrize("fault,signum", [("sigint", signal.SIGINT), ("sigterm", signal.SIGTERM)])
@pytest.mark.slow
def test_signal_prints_one_line_exits_128_plus_signum_and_rerun_resumes(
  monkeypatch, capsys, caplog, tmp_path, fault, signum
):
  run_dir = str(tmp_path / "run")
  argv = BASE + [f"--run_dir={run_dir}", "--epochs=2"]
  monkeypatch.setenv("BAN_TF_FAULT", f"{fault}@gen_0/epoch_1")
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  code, err = _main(monkeypatch, capsys, argv)
  assert code == 128 + signum == {"sigint": 130, "sigterm": 143}[fault]
  assert err.strip() == "interrupted at gen_0 epoch 1: rerun the same command to resume"
  assert (
    signal.getsignal(signal.SIGINT),
    signal.getsignal(signal.SIGTERM),
  ) == before  # handlers restored
  gen0 = os.path.join(run_dir, "gen_0")
  assert (
    "ckpt-1" in open(os.path.join(gen0, "ckpt", "checkpoint")).read()
  )  # the last checkpoint is kept
  assert not os.path.exists(os.path.join(gen0, "DONE"))
  monkeypatch.delenv("BAN_TF_FAULT")
  with caplog.at_level(logging.INFO, logger="absl"):
    code, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "gen 0: resuming from epoch 1" in caplog.text
  assert os.path.exists(os.path.join(gen0, "DONE"))


def _progress_for_ban1():
  """(a BAN-1 generation stand-in, console.Progress of 9 epochs over 2 generations, its printed lines)."""

  class Gen:
    gen, role, out_dir = 1, "BAN-1", "/x/gen_1"

  lines = []
  p = console.Progress(total_epochs=9, gens=2, out=None)
  p.print = lines.append
  return Gen, p, lines


def test_progress_line_has_generation_epoch_elapsed_and_eta():
  Gen, p, lines = _progress_for_ban1()
  p.t0 -= 30  # 30 s since the run started
  p.skip(3)  # the teacher was done before
  p.generation(Gen, "tiny", first_epoch=1, epochs=3)  # BAN-1 resumes at epoch 2
  p.epoch_end(Gen, 1, 3, {"loss": 1.5, "accuracy": 0.5, "val_accuracy": 0.25}, 0.02)
  assert lines[0] == "gen 1/2 BAN-1: tiny (resuming at epoch 2)"
  # 5 of 9 epochs done (3 + 1 found, 1 trained in 30 s): 4 to go at 30 s each.
  assert lines[1] == (
    "gen 1/2 BAN-1 epoch 2/3: loss 1.5, accuracy 0.5, val_accuracy 0.25, lr 0.02 | "
    "elapsed 0:00:30, run ETA 0:02:00 (5/9 epochs)"
  )


def test_interrupted_after_the_last_epoch_says_evaluation_not_an_epoch_past_the_end():
  Gen, p, lines = _progress_for_ban1()
  p.generation(Gen, "tiny", first_epoch=2, epochs=3)
  p.epoch_end(Gen, 2, 3, {"loss": 1.5}, 0.02)  # the last epoch: evaluation and export follow
  assert p.where == "gen_1 evaluation (all 3 epochs trained)"
  p.generation(Gen, "tiny", first_epoch=3, epochs=3)  # resumed after all of its epochs
  assert lines[-1] == "gen 1/2 BAN-1: tiny (all 3 epochs trained before: evaluating and exporting)"
  assert p.where == "gen_1 evaluation (all 3 epochs trained)"


@pytest.mark.slow
def test_binary_console_is_quiet_fits_a_screen_and_sigterm_exits_143(tmp_path):
  """The real binary: no TensorFlow noise on the console, one line per epoch, log.txt has the rest."""
  run_dir = str(tmp_path / "run")
  env = dict(os.environ, BAN_TF_FAULT="sigterm@gen_1/epoch_1")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.main",
      *BASE,
      "--gens=1",
      "--epochs=2",
      "--verbose=auto",
      f"--run_dir={run_dir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert proc.stderr.strip() == "interrupted at gen_1 epoch 1: rerun the same command to resume"
  out = proc.stdout.splitlines()
  assert len(out) <= 12, proc.stdout
  assert out[0].startswith(
    "fashion_mnist (train/val/test 256/0/256 examples), tiny, 1 generation of ban"
  )
  assert out[2] == "gen 0/1 teacher: tiny (1.5k params), labels only, no teacher, seed 0"
  assert (
    out[3].startswith("gen 0/1 teacher epoch 1/2: loss ")
    and "run ETA" in out[3]
    and "(1/4 epochs)" in out[3]
  )
  assert out[5].startswith("gen 0/1 teacher done: test error ")
  assert (
    out[6] == "gen 1/1 BAN-1: tiny (1.5k params), ban (T=1, KD weight 1), teacher gen_0, seed 1"
  )
  log = open(os.path.join(run_dir, console.LOG_FILE)).read()
  assert "config: {" in log and "gen 0 (teacher) done" in log  # everything the console left out
  assert "(printed while TensorFlow was imported)" in log


def test_quick_start_flags_are_the_papers_and_have_their_own_run_dir():
  """README's quick start (flags/cifar10.flags): WRN dropout 0.3 as in the paper, and a run directory
  that the bare --dataset=cifar10 command (dropout 0) does not share (it would refuse the other)."""
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf", f"--flagfile={os.path.join(REPO, 'flags', 'cifar10.flags')}"])
  cfg = main.config_from_flags(fv)
  assert (cfg.arch, cfg.dropout, cfg.epochs, cfg.lr, cfg.weight_decay) == (
    "wrn-28-1",
    0.3,
    200,
    0.1,
    5e-4,
  )
  bare = main.config_from_flags(_parsed(["--dataset=cifar10", "--gens=3"]))
  assert bare.dropout == 0 and cfg.run_dir != bare.default_run_dir()
  assert "--flagfile=flags/cifar10.flags" in open(os.path.join(REPO, "README.md")).read()


def _parsed(argv):
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf"] + argv)
  return fv


def test_bare_verbose_flag_is_accepted():
  """`--verbose` alone means --verbose=1 (absl string flags otherwise need a value)."""
  proc = subprocess.run(
    [sys.executable, "-m", "ban_tf.main", "--verbose", "--gens=-1"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: --gens=-1"), proc.stderr


def test_tensorboard_cut_back_to_the_checkpoint(tmp_path):
  """Epochs after the checkpoint and test/* (written after the last epoch, before DONE) go; the rest stays."""
  from ban_tf import rundir  # pylint: disable=g-import-not-at-top

  logdir = str(tmp_path / "tb")
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    for step in (1, 2, 3):
      tf.summary.scalar("train/loss", 1.0 / step, step=step)
    tf.summary.scalar("test/error", 0.5, step=3)
  writer.close()
  rundir.truncate_tensorboard(logdir, 3)  # killed during the export: all epochs checkpointed
  assert _scalars(logdir) == {"train/loss": [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]}
  rundir.truncate_tensorboard(logdir, 1)
  assert _scalars(logdir) == {"train/loss": [(1, 1.0)]}
  assert len(os.listdir(logdir)) == 1  # one events file, no temporary left
