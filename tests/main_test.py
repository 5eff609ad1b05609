"""The binary: flags, the paper defaults, usage errors (exit code 2, one line, nothing written)."""

import os
import subprocess
import sys

import pytest
from absl import flags

from ban_tf import errors
from ban_tf import main
from tests.conftest import REPO


def parse(*argv):
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["ban_tf.main", *argv])
  return main.config_from_flags(fv)


def test_defaults_are_the_paper_recipe():
  cfg = parse()
  assert (
    cfg.dataset,
    cfg.gens,
    cfg.epochs,
    cfg.batch_size,
    cfg.lr,
    cfg.momentum,
    cfg.nesterov,
    cfg.weight_decay,
    cfg.lr_decay,
    cfg.lr_milestones,
  ) == ("cifar10", 3, 200, 128, 0.1, 0.9, True, 5e-4, 0.2, (0.3, 0.6, 0.8))
  assert {
    k: cfg.objective().to_dict()[k] for k in ("loss", "temperature", "kd_weight", "label_weight")
  } == {"loss": "ban", "temperature": 1.0, "kd_weight": 1.0, "label_weight": 0.0}
  assert parse("--label_weight=0.5").objective().loss == "ban_l"
  assert cfg.default_run_dir() == os.path.join("runs", "cifar10-wrn-28-1-ban-seed0")


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--gens=-1"], "--gens=-1"),
    (["--temperature=0"], "--temperature=0.0: must be > 0"),
    (["--kd_weight=-1"], "--kd_weight"),
    (["--label_weight=-0.5"], "--label_weight"),
    (["--loss=foo"], "unknown objective; use one of ban, ban_l, kd, cwtm, dkpp"),
    (["--arch=wrn-27-1"], "6n+4"),
    (["--arch=resnet50"], "--arch='resnet50'"),
    (["--epochs=0"], "--epochs=0"),
    (["--augment=rotate"], "--augment"),
    (["--lr_milestones=0.8,0.3"], "increasing fractions"),
    (["--kd_weight=0"], "both 0"),
  ],
)
def test_bad_values_raise_one_line_usage_errors(argv, message):
  with pytest.raises(errors.UsageError) as e:
    parse(*argv).validate()
  assert message in str(e.value)
  assert "\n" not in str(e.value)


def test_batch_must_divide_over_replicas():
  with pytest.raises(errors.UsageError, match="not divisible by the 2 replicas"):
    parse("--batch_size=33").validate(num_replicas=2)


def test_make_strategy_never_shrinks_the_logical_cpus_the_process_configured(monkeypatch):
  """A process that configured 3 logical CPUs (this one: tests/conftest.py; a notebook) keeps
  them when it asks for 2 first. Shrinking them to 2 before TensorFlow started made every
  later 3-replica run of the process fail ("only 2 logical CPUs exist"): in a test process
  whose first run used 2 replicas."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(tf.config, "set_logical_device_configuration", lambda *a: calls.append(a))
  assert (
    len(tf.config.get_logical_device_configuration(tf.config.list_physical_devices("CPU")[0])) == 3
  )
  assert main.make_strategy(2).num_replicas_in_sync == 2
  assert main.make_strategy(3).num_replicas_in_sync == 3
  assert not calls


def _run_binary(tmp_path, *argv):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
    [sys.executable, "-m", "ban_tf.main", *argv],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_binary_exit_code_2_one_line_and_nothing_written(tmp_path):
  run_dir = tmp_path / "run"
  proc = _run_binary(tmp_path, "--loss=nope", f"--run_dir={run_dir}")
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines == ["error: --loss='nope': unknown objective; use one of ban, ban_l, kd, cwtm, dkpp"]
  proc = _run_binary(tmp_path, "--no_such_flag=1", f"--run_dir={run_dir}")
  assert proc.returncode == 2
  assert (
    "no_such_flag" in proc.stderr and len([l for l in proc.stderr.splitlines() if l.strip()]) == 1
  )
  assert not run_dir.exists()


# The run-directory contract of a finished two-generation run (every file, teachers read from disk,
# results.json, results.md, a rerun skips everything): multireplica_test.py::
# test_run_exports_what_it_reports, on 1 and 2 replicas (it trained the same kind of run).
