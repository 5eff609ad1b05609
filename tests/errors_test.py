"""Bad input, broken run directories, full disks and divergence (issue 5).

Every bad input must end the binary with exit code 2 and one `error: ...` line on
stderr that names the fix, and must leave the run directory as it was (not created,
or unchanged apart from its lock file, which records the current holder). Most
cases call `main.main` in this process with its own FlagValues (cheap); two
subprocess tests prove the same through the real binary. Damaged and refused runs are
copies of conftest's fabricated finished run (no training); only the cases whose behaviour
is training (a full disk, divergence, NaN) train a tiny teacher.
"""

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import flags
import pytest

from ban_tf import errors
from ban_tf import main
from tests.conftest import IMAGE_ARGS
from tests.conftest import REPO
from tests.conftest import copy_run
from tests.conftest import run_main

BASE = IMAGE_ARGS + ["--epochs=1", "--gens=0"]  # a teacher of one epoch
FINISHED = IMAGE_ARGS + ["--gens=2"]  # the flags of conftest's fabricated_image_run


def _main(monkeypatch, capsys, argv):
  """Runs the binary's main() in-process; returns (exit code, stderr)."""
  code, _, err = run_main(monkeypatch, capsys, argv)
  return code, err


def _one_error_line(stderr, *needles):
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def _rerun_resumes_gen0_from_epoch_1(monkeypatch, capsys, caplog, argv, gen0):
  """With the fault gone, the same command exits 0, resumes gen 0 from epoch 1, finishes it."""
  monkeypatch.delenv("BAN_TF_FAULT")
  with caplog.at_level(logging.INFO, logger="absl"):
    code, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "gen 0: resuming from epoch 1" in caplog.text
  assert os.path.exists(os.path.join(gen0, "DONE"))


def _snapshot(run_dir):
  """Every file (but the lock) with a hash of its content and its mtime."""
  out = {}
  for parent, _, files in os.walk(run_dir):
    for name in files:
      path = os.path.join(parent, name)
      if name != ".lock":
        with open(path, "rb") as f:
          out[os.path.relpath(path, run_dir)] = (
            hashlib.sha1(f.read()).hexdigest(),
            os.stat(path).st_mtime_ns,
          )
  return out


# ---- bad flags and data: nothing may be created ---------------------------------


@pytest.mark.parametrize(
  "argv,needles",
  [
    (["--dataset=no_such_dataset"], ["unknown dataset", "--dataset"]),
    (["--arch=resnet-7"], ["--arch='resnet-7'"]),
    (["--loss=hinton"], ["--loss='hinton'", "use one of"]),
    (["--gens=-1"], ["--gens=-1", ">= 0"]),
    (["--temperature=0"], ["--temperature=0.0", "> 0"]),
    (["--kd_weight=-1"], ["--kd_weight=-1.0", ">= 0"]),
    (["--label_weight=-0.5"], ["--label_weight=-0.5", ">= 0"]),
    (["--num_cpu_devices=2", "--batch_size=33"], ["--batch_size=33", "multiple of 2"]),
    (["--batch_size=512"], ["--batch_size=512", "exceeds"]),
  ],
)
def test_bad_flag_exits_2_and_creates_nothing(monkeypatch, capsys, tmp_path, argv, needles):
  run_dir = tmp_path / "run"
  code, err = _main(monkeypatch, capsys, BASE + [f"--run_dir={run_dir}"] + argv)
  assert code == 2
  _one_error_line(err, *needles)
  assert not run_dir.exists()


def test_missing_data_dir_is_an_error_not_created(monkeypatch, capsys, tmp_path):
  missing = tmp_path / "no_tfds_here"
  code, err = _main(
    monkeypatch, capsys, BASE + [f"--run_dir={tmp_path / 'run'}", f"--data_dir={missing}"]
  )
  assert code == 2
  _one_error_line(err, f"--data_dir={missing} does not exist")
  assert not missing.exists() and not (tmp_path / "run").exists()


def test_dataset_not_prepared_offline_fails_fast(monkeypatch, capsys, caplog, tmp_path):
  from ban_tf import data  # pylint: disable=g-import-not-at-top

  # Downloads are impossible here; make them so on a machine with internet too.
  monkeypatch.setattr(data, "_DOWNLOAD_PROBE", ("invalid.invalid", 443))
  empty = tmp_path / "tfds"
  empty.mkdir()
  t0 = time.time()
  with caplog.at_level(logging.WARNING):
    code, err = _main(
      monkeypatch,
      capsys,
      BASE + [f"--run_dir={tmp_path / 'run'}", f"--data_dir={empty}", "--dataset=mnist"],
    )
  assert code == 2
  _one_error_line(
    err,
    "'mnist' is not prepared",
    "cannot be downloaded",
    "--data_dir",
    "docs/data.md: 'tfds data sets'",
  )
  # Only our line: not tfds' "Variant folder ... has no dataset_info.json" before it.
  assert not [r.getMessage() for r in caplog.records if "dataset_info.json" in r.getMessage()]
  assert time.time() - t0 < 60  # tfds' own retries take minutes
  assert not os.listdir(empty) and not (tmp_path / "run").exists()


def test_bad_flag_through_the_binary_exits_2():
  proc = subprocess.run(
    [sys.executable, "-m", "ban_tf.main", "--temperature=-1", "--run_dir=/nonexistent/run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == "error: --temperature=-1.0: must be > 0"


# ---- an existing run directory: refused runs change nothing ----------------------


@pytest.fixture
def run_copy(fabricated_image_run, tmp_path):
  """A finished run of FINISHED (Teacher, BAN-1, BAN-2, BANE-2), made without training."""
  return copy_run(fabricated_image_run, tmp_path)


def _corrupt(run_dir, how):
  sm = os.path.join(run_dir, "gen_0", "saved_model")
  data_file = os.path.join(sm, "variables", "variables.data-00000-of-00001")
  if how == "deleted":
    shutil.rmtree(sm)
  elif how == "truncated":
    with open(data_file, "r+b") as f:
      f.truncate(os.path.getsize(data_file) // 3)
  elif how == "scrambled":  # same size; fails TF's per-tensor checksums
    size = os.path.getsize(data_file)
    with open(data_file, "wb") as f:
      f.write(bytes((i * 37 + 11) % 251 for i in range(size)))
  elif how == "replaced":  # another valid model under the old fingerprint: loads, wrong logits
    from ban_tf import export, models  # pylint: disable=g-import-not-at-top

    fingerprint = os.path.join(sm, export.FINGERPRINT_FILE)
    kept = open(fingerprint, "rb").read()
    export.export_saved_model(models.build_model("tiny", 10, (28, 28, 1)), sm, (28, 28, 1))
    with open(fingerprint, "wb") as f:
      f.write(kept)
  elif how == "wrong_classes":  # a valid, fingerprinted SavedModel with 5 outputs
    from ban_tf import export, models  # pylint: disable=g-import-not-at-top

    export.export_saved_model(models.build_model("tiny", 5, (28, 28, 1)), sm, (28, 28, 1))


@pytest.mark.parametrize(
  "how,needles",
  [
    ("deleted", ["is missing or incomplete", "--overwrite"]),
    ("truncated", ["cannot be loaded", "--overwrite"]),
    ("scrambled", ["cannot be loaded", "--overwrite"]),
    ("replaced", ["does not reproduce its fingerprint", "--overwrite"]),
    ("wrong_classes", ["outputs shape (5,)", "10 classes", "same data set"]),
  ],
)
def test_broken_teacher_is_refused_before_anything_is_written(
  monkeypatch, capsys, run_copy, how, needles
):
  _corrupt(run_copy, how)
  before = _snapshot(run_copy)
  code, err = _main(monkeypatch, capsys, FINISHED + [f"--run_dir={run_copy}", "--gens=3"])
  assert code == 2
  _one_error_line(err, "gen_0/saved_model", *needles)
  assert _snapshot(run_copy) == before


@pytest.mark.slow
def test_changed_experiment_flag_is_refused_unless_overwrite(monkeypatch, capsys, run_copy):
  before = _snapshot(run_copy)
  code, err = _main(monkeypatch, capsys, FINISHED + [f"--run_dir={run_copy}", "--lr=0.05"])
  assert code == 2
  _one_error_line(err, "differs in lr", "--overwrite")
  assert _snapshot(run_copy) == before
  # A logging-only flag is allowed and retrains nothing.
  code, err = _main(monkeypatch, capsys, FINISHED + [f"--run_dir={run_copy}", "--verbose=2"])
  assert code == 0, err
  after = _snapshot(run_copy)
  trained = lambda snap: {
    k: v for k, v in snap.items() if k.startswith(("gen_", "ensemble_")) and "/tb/" not in k
  }
  assert trained(after) == trained(before)  # (TensorBoard hparams are rewritten by the report)
  # --overwrite starts over with the new value (here a one-epoch teacher).
  code, err = _main(
    monkeypatch, capsys, BASE + [f"--run_dir={run_copy}", "--lr=0.05", "--overwrite"]
  )
  assert code == 0, err
  assert _snapshot(run_copy)["gen_0/DONE"] != before["gen_0/DONE"]


@pytest.mark.slow
def test_second_process_is_refused_and_a_killed_holder_frees_the_lock(
  monkeypatch, capsys, tmp_path
):
  from ban_tf import rundir  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / "run")
  argv = BASE + [f"--run_dir={run_dir}", "--epochs=500"]
  holder = subprocess.Popen(
    [sys.executable, "-m", "ban_tf.main"] + argv,
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
  )
  try:
    config_json = os.path.join(run_dir, "config.json")
    deadline = time.time() + 300
    while not os.path.exists(config_json) and holder.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert holder.poll() is None, "the first process ended early"
    before = _snapshot(run_dir)
    code, err = _main(monkeypatch, capsys, argv)
    assert code == 2
    _one_error_line(err, f"is in use by pid {holder.pid}", "another --run_dir")
    assert set(_snapshot(run_dir)) >= set(before)  # the holder keeps writing; we wrote nothing
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf"] + argv)
  with rundir.RunDir(run_dir, main.config_from_flags(fv)) as run:  # not stuck
    assert (
      open(os.path.join(run.path, rundir.LOCK_FILE)).read()
      == f"pid {os.getpid()} on {os.uname()[1]}"
    )


def test_run_dir_that_cannot_be_made_is_a_usage_error():
  """A run_dir the path checks pass but mkdir refuses (root under /proc): one error line, no traceback."""
  from ban_tf import config, rundir  # pylint: disable=g-import-not-at-top

  with pytest.raises(
    errors.RunDirError, match=r"/proc/ban_tf_nonexistent/run cannot be created or written"
  ):
    rundir.RunDir("/proc/ban_tf_nonexistent/run", config.Config(arch="tiny")).open()


# ---- full disk --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (needs root); else a plain directory and the `enospc` fault."""
  path = tmp_path / "disk"
  path.mkdir()
  mounted = (
    subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True
    ).returncode
    == 0
  )
  yield str(path), "fill_disk" if mounted else "enospc"
  if mounted:
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.slow
def test_full_disk_exits_2_keeps_checkpoint_and_resumes(monkeypatch, capsys, caplog, small_disk):
  disk, fault = small_disk
  run_dir = os.path.join(disk, "run")
  argv = BASE + [f"--run_dir={run_dir}", "--epochs=2"]
  monkeypatch.setenv("BAN_TF_FAULT", f"{fault}@gen_0/epoch_2")
  code, err = _main(monkeypatch, capsys, argv)
  assert code == 2
  _one_error_line(err, "no space left", "rerun the same command")
  gen0 = os.path.join(run_dir, "gen_0")
  assert not os.path.exists(os.path.join(gen0, "DONE"))
  assert "ckpt-1" in open(os.path.join(gen0, "ckpt", "checkpoint")).read()
  if os.path.exists(os.path.join(gen0, "FILLER")):
    os.remove(os.path.join(gen0, "FILLER"))  # the user frees space
  _rerun_resumes_gen0_from_epoch_1(monkeypatch, capsys, caplog, argv, gen0)


# ---- NaN / Inf ----------------------------------------------------------------------


def test_real_divergence_exits_1_with_a_clear_message(monkeypatch, capsys, tmp_path):
  run_dir = tmp_path / "run"
  code, err = _main(monkeypatch, capsys, BASE + [f"--run_dir={run_dir}", "--lr=1e30"])
  assert code == 1
  line = _one_error_line(
    err, "generation 0 diverged", "in epoch 1", "no good checkpoint", "lower --lr", "--overwrite"
  )
  assert "loss=nan" in line or "loss=inf" in line
  assert not (run_dir / "gen_0" / "DONE").exists()


@pytest.mark.slow
def test_nan_keeps_last_good_checkpoint_and_rerun_resumes(monkeypatch, capsys, caplog, tmp_path):
  run_dir = str(tmp_path / "run")
  argv = BASE + [f"--run_dir={run_dir}", "--epochs=2"]
  monkeypatch.setenv("BAN_TF_FAULT", "nan@gen_0/epoch_2")
  code, err = _main(monkeypatch, capsys, argv)
  assert code == 1
  _one_error_line(
    err, "generation 0 diverged (loss=nan) in epoch 2", "last good checkpoint (epoch 1)"
  )
  gen0 = os.path.join(run_dir, "gen_0")
  assert "ckpt-1" in open(os.path.join(gen0, "ckpt", "checkpoint")).read()
  assert not os.path.exists(os.path.join(gen0, "ckpt", "ckpt-2.index"))
  assert not os.path.exists(os.path.join(gen0, "DONE"))
  _rerun_resumes_gen0_from_epoch_1(monkeypatch, capsys, caplog, argv, gen0)
