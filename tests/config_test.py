"""Config: one source of flag names, types and defaults; from_flags / from_dict; fast usage errors."""

import dataclasses
import json
import os
import resource
import subprocess
import sys

import pytest
from absl import flags

from ban_tf import config
from ban_tf import errors
from ban_tf import main
from tests.conftest import REPO


def _fresh_flags():
  fv = flags.FlagValues()
  main.define_flags(fv)
  return fv


def test_flag_names_are_the_config_fields():
  fv = _fresh_flags()
  ours = [n for n in fv if fv[n].help and fv[n].help.startswith("[")]
  assert sorted(ours) == sorted(f.name for f in dataclasses.fields(config.Config))


def test_flag_defaults_are_the_config_defaults():
  fv = _fresh_flags()
  fv(["prog"])
  assert config.Config.from_flags(fv) == config.Config()


def test_from_flags_reads_every_field():
  fv = _fresh_flags()
  fv(
    [
      "prog",
      "--task=lm",
      "--arch=lstm-1-8",
      "--lr_milestones=0.5,0.75",
      "--gens=4",
      "--nonesterov",
      "--teacher_arch=lstm-2-8",
      "--clip_norm=5",
      "--verbose=0",
    ]
  )
  cfg = config.Config.from_flags(fv)
  assert (
    cfg.task,
    cfg.arch,
    cfg.gens,
    cfg.nesterov,
    cfg.teacher_arch,
    cfg.clip_norm,
    cfg.verbose,
  ) == ("lm", "lstm-1-8", 4, False, "lstm-2-8", 5.0, "0")
  assert cfg.lr_milestones == (0.5, 0.75)
  fv = _fresh_flags()
  fv(["prog", "--lr_milestones=0.5,x"])
  with pytest.raises(errors.UsageError, match="--lr_milestones=0.5,x"):
    config.Config.from_flags(fv)


def test_data_paths_are_stored_absolute(tmp_path, monkeypatch):
  """config.json holds absolute data paths, so evaluate works from any directory; URLs stay as given."""
  monkeypatch.chdir(tmp_path)
  fv = _fresh_flags()
  fv(["prog", "--data_dir=../tfds", "--ptb_dir=ptb", "--image_folder=imgs"])
  cfg = config.Config.from_flags(fv)
  assert (cfg.data_dir, cfg.ptb_dir, cfg.image_folder) == (
    str(tmp_path.parent / "tfds"),
    str(tmp_path / "ptb"),
    str(tmp_path / "imgs"),
  )
  fv = _fresh_flags()
  fv(["prog", "--data_dir=gs://bucket/tfds"])
  assert config.Config.from_flags(fv).data_dir == "gs://bucket/tfds"


def test_from_dict_round_trip_and_old_run_dirs():
  cfg = config.Config(arch="tiny", lr_milestones=(0.5,), seeds=2)
  stored = json.loads(cfg.to_json())
  assert config.Config.from_dict(stored) == cfg
  # A config.json written before a field existed (here: task, clip_norm) still loads.
  old = {k: v for k, v in stored.items() if k not in ("task", "clip_norm")}
  assert config.Config.from_dict(old) == cfg
  assert cfg.experiment_diff(stored) == []


@pytest.mark.parametrize(
  "argv,needle",
  [
    (["--arch=wrn-27-1"], "--arch='wrn-27-1'"),
    (["--task=lm", "--dataset=tiny_shakespeare", "--arch=wrn-28-1"], "--arch='wrn-28-1'"),
    (["--task=audio"], "--task='audio'"),
  ],
)
def test_bad_flag_is_one_line_and_fast(argv, needle):
  """One `error:` line, exit 2, in well under 2 s: validation loads no TensorFlow (~0.1 s idle).

  Timed as the child's CPU time, which a loaded machine does not inflate as it does wall time.
  """
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  proc = subprocess.run(
    [sys.executable, "-m", "ban_tf.main"] + argv,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
  )
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
  assert cpu < 2.0, f"{cpu:.1f} s of CPU: validation must not import TensorFlow"
