"""The contract every task keeps, checked for each entry of tasks.TASKS (issue 11).

One tiny run per task (image: 128 fashion_mnist images, a 32-image val split and 64 test images,
2 steps an epoch; lm: a generated PTB-format corpus of 60 lines), teacher + 2 generations of 2
epochs:

  1. killed (SIGKILL) right after generation 1's first epoch checkpoint, then the
     same command resumes generation 1 from epoch 1 and finishes;
  2. the same command again skips every generation, exits 0 and rewrites nothing;
  3. ban_tf.evaluate reloads the SavedModels and reproduces results.json (val and
     test, in the task's headline metric);
  4. ban_tf.report writes the table and report.png;
  5. --seeds=2 (LM on 2 replicas) summarises the task's headline metric; the same
     command again skips every generation of every seed and changes no file; report on
     that parent works and writes report.png (the ban_tf.report binary for LM).

A new task gets all of this by adding its entry to _RUNS.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ban_tf import evaluate
from ban_tf import export
from ban_tf import report
from ban_tf import tasks
from tests.conftest import LM_ARGS
from tests.conftest import REPO
from tests.conftest import SHARED_TFDS
from tests.conftest import run_main

_WORDS = "the cat dog sat on mat a big small red ran fast slow house tree".split()


def _corpus(directory):
  rng = np.random.RandomState(0)
  for name, lines in (("train", 60), ("valid", 20), ("test", 20)):
    with open(os.path.join(directory, f"ptb.{name}.txt"), "w") as f:
      for _ in range(lines):
        f.write(" " + " ".join(str(w) for w in rng.choice(_WORDS, rng.randint(3, 9))) + " \n")
  return directory


def _image_argv(tmp_path):
  if not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")):
    pytest.skip("no shared fashion_mnist")
  return [
    "--task=image",
    "--dataset=fashion_mnist",
    f"--data_dir={SHARED_TFDS}",
    "--arch=tiny",
    "--train_examples=128",
    "--val_examples=32",
    "--test_split=test[:64]",
    "--batch_size=64",
    "--lr=0.05",
  ]


def _lm_argv(tmp_path):
  ptb = _corpus(str(tmp_path))
  return [f"--ptb_dir={ptb}"] + LM_ARGS


_RUNS = {"image": _image_argv, "lm": _lm_argv}


def test_every_task_has_a_contract_run():
  assert set(_RUNS) == set(tasks.TASKS)


def _main(monkeypatch, capsys, argv):
  """The binary's main() in this process (its own FlagValues); returns (exit code, stdout, stderr)."""
  return run_main(monkeypatch, capsys, argv)


def _snapshot(run_dir):
  """{file: mtime} of every generation's and ensemble's files but TensorBoard's (report
  rewrites the hparams sessions of every run by design)."""
  out = {}
  for parent, _, files in os.walk(run_dir):
    rel = os.path.relpath(parent, run_dir)
    if rel.startswith(("gen_", "ensemble_")) and os.path.basename(rel) != "tb":
      out.update(
        {os.path.join(rel, f): os.stat(os.path.join(parent, f)).st_mtime_ns for f in files}
      )
  return out


def _snapshot_seeds(parent):
  """_snapshot of every seed's run directory, keyed by seed_S/."""
  return {
    os.path.join(d, k): v
    for d in sorted(os.listdir(parent))
    if d.startswith("seed_")
    for k, v in _snapshot(os.path.join(parent, d)).items()
  }


def _assert_png(path):
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 800
    assert len(set(im.convert("RGB").getdata())) > 50  # not blank


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_RUNS))
def test_kill_resume_rerun_evaluate_report(name, tmp_path, monkeypatch, capsys, caplog):
  task = tasks.get(name)
  run_dir = str(tmp_path / "run")
  argv = _RUNS[name](tmp_path) + ["--gens=2", "--epochs=2", "--verbose=0", f"--run_dir={run_dir}"]

  # 1. Killed right after generation 1 saved its epoch-1 checkpoint.
  env = dict(
    os.environ, BAN_TF_FAULT="kill_after_checkpoint@gen_1/epoch_1", TF_CPP_MIN_LOG_LEVEL="2"
  )
  proc = subprocess.run(
    [sys.executable, "-m", "ban_tf.main"] + argv,
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert export.is_done(os.path.join(run_dir, "gen_0")) and not export.is_done(
    os.path.join(run_dir, "gen_1")
  )
  gen0 = _snapshot(run_dir)
  gen0 = {k: v for k, v in gen0.items() if k.startswith("gen_0")}

  # ... the same command resumes generation 1 from epoch 1 and finishes the run.
  with caplog.at_level(logging.INFO, logger="absl"):
    code, out, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert "gen 0 already done" in caplog.text and "gen 1: resuming from epoch 1" in caplog.text
  assert {
    k: v for k, v in _snapshot(run_dir).items() if k.startswith("gen_0")
  } == gen0  # not retrained
  history = export.read_json(os.path.join(run_dir, "gen_1", "history.json"))
  assert [h["epoch"] for h in history] == [1, 2]
  results = export.read_json(os.path.join(run_dir, "results.json"))
  assert [g["gen"] for g in results["generations"]] == [0, 1, 2] and len(results["ensembles"]) == 1
  assert task.headline.title in out  # the results table, printed

  # 2. The same command again: every generation skipped, exit 0, nothing rewritten.
  before = _snapshot(run_dir)
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"):
    code, out, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert all(f"gen {g} already done" in caplog.text for g in range(3))
  assert "resuming" not in caplog.text
  assert _snapshot(run_dir) == before
  assert export.read_json(os.path.join(run_dir, "results.json")) == results

  # 3. evaluate: the SavedModels reproduce results.json, val and test, in the headline metric.
  evaluated = evaluate.evaluate_run(run_dir)
  assert evaluated["splits"] == ["val", "test"]
  for got, want in zip(
    evaluated["generations"] + evaluated["ensembles"], results["generations"] + results["ensembles"]
  ):
    for key in (task.headline.key, "test_accuracy", "val_accuracy") + tuple(
      m.key for m in task.extra_columns if m.derive is None
    ):
      np.testing.assert_allclose(
        got[key], want[key], rtol=2e-5, atol=1e-6, err_msg=f"{key} of {want}"
      )
  table = evaluate.table(evaluated)
  assert task.headline.title in table and "| Teacher |" in table and "| BANE-2 |" in table

  # 4. report: results.md (the table) and report.png.
  paths = report.write_report(run_dir, hparams=False)
  md = open(paths["results_md"]).read()
  assert task.headline.title in md and "| BAN-2 |" in md
  _assert_png(paths["png"])


def _digests(run_dir):
  """{file: sha256} of a run directory but for what every process rewrites by design:
  the lock, log.txt (appended) and TensorBoard's report summaries (hparams sessions and the
  generation series, replaced on every report)."""
  out = {}
  for parent, _, files in os.walk(run_dir):
    for f in files:
      if f not in (".lock", "log.txt") and not f.endswith((".hparams", ".series")):
        with open(os.path.join(parent, f), "rb") as fh:
          out[os.path.relpath(os.path.join(parent, f), run_dir)] = hashlib.sha256(
            fh.read()
          ).hexdigest()
  return out


# --seeds=2 on 2 replicas for LM, on one for image (also tests/variants_run_test.py).
_SEEDS_REPLICAS = {"image": 1, "lm": 2}
# ban_tf.report as a subprocess for one task (the command and its exit code); in process otherwise.
_REPORT_BINARY = {"image": False, "lm": True}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_RUNS))
def test_seeds_summary_is_in_the_headline_metric(name, tmp_path, monkeypatch, capsys):
  task = tasks.get(name)
  parent = str(tmp_path / "seeds")
  replicas = _SEEDS_REPLICAS[name]
  argv = _RUNS[name](tmp_path) + [
    "--gens=1",
    "--epochs=1",
    "--seeds=2",
    "--verbose=0",
    f"--run_dir={parent}",
    f"--num_cpu_devices={replicas}",
  ]
  code, out, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  assert out.splitlines()[0].endswith(f", {replicas} replica" + "s" * (replicas > 1)), out
  summary = export.read_json(os.path.join(parent, "results.json"))
  assert summary["seeds"] == [0, 100] and summary["metric"] == task.headline.key
  per_seed = [export.read_json(os.path.join(parent, f"seed_{s}", "results.json")) for s in (0, 100)]
  rows = {r["key"]: r for r in summary["rows"]}
  assert list(rows) == ["Teacher", "BAN-1"]
  for gen, key in enumerate(rows):
    values = [task.headline.value(r["generations"][gen]) for r in per_seed]
    np.testing.assert_allclose(rows[key]["values"], values)
    np.testing.assert_allclose(rows[key]["mean"], np.mean(values))
    np.testing.assert_allclose(rows[key]["std"], np.std(values, ddof=1))
  md = open(os.path.join(parent, "results.md")).read()
  assert f"{task.headline.title} mean ± std" in md and md in out
  _assert_png(os.path.join(parent, "report.png"))
  # The same command again: every generation of both seeds skipped, nothing trained, every
  # file byte-identical and the seeds' generation files untouched.
  before, mtimes = _digests(parent), _snapshot_seeds(parent)
  code, out, err = _main(monkeypatch, capsys, argv)
  assert code == 0, err
  skipped = [l for l in out.splitlines() if l.endswith("done before, skipped")]
  assert [l.split()[:2] + l.split()[3:5] for l in skipped] == [
    ["seed", str(s), "gen", f"{g}/1"] for s in (0, 100) for g in (0, 1)
  ], out
  assert not re.search(r" epoch \d+/\d+:", out) and "resuming" not in out, out
  assert _digests(parent) == before
  assert _snapshot_seeds(parent) == mtimes and mtimes
  assert md in out
  # report on the parent of the seed runs: the binary (as the README says) once, in this process
  # for the other task (the binary itself is also tests/report_test.py's).
  os.remove(os.path.join(parent, "report.png"))
  os.remove(os.path.join(parent, "results.md"))
  if _REPORT_BINARY[name]:
    proc = subprocess.run(
      [sys.executable, "-m", "ban_tf.report", f"--run_dir={parent}", "--nohparams"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{task.headline.title} mean ± std" in proc.stdout
  else:
    report.write_report(parent, hparams=False)
  assert f"{task.headline.title} mean ± std" in open(os.path.join(parent, "results.md")).read()
  _assert_png(os.path.join(parent, "report.png"))
  assert json.load(open(os.path.join(parent, "results.json"))) == summary  # the summary is kept
