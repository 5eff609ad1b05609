"""Tests for ban_tf.report on small run directories written here (no training).

The end-to-end path (a real run writes its report) is in run_outputs_test.py.
"""

import glob
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.plugins.hparams import metadata as hp_metadata

from ban_tf import config as config_lib
from ban_tf import errors
from ban_tf import report
from tests.conftest import REPO


def _fake_run(path, seed, test_errors, val=True, epochs=3, baseline=None, student_seed=None):
  """A run dir as ban_tf.main leaves it: teacher, BAN-1, BAN-2 and BANE-2."""
  os.makedirs(path)
  cfg = config_lib.Config(
    dataset="fashion_mnist",
    arch="tiny",
    gens=2,
    epochs=epochs,
    seed=seed,
    val_examples=100 if val else 0,
    run_dir=path,
    student_seed=student_seed,
  )
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  rng = np.random.RandomState(seed)
  gens = []
  for gen, err in enumerate(test_errors[:3]):
    objective = {"loss": "labels" if gen == 0 else "ban", "temperature": 1.0}
    g = {
      "gen": gen,
      "role": "teacher" if gen == 0 else f"BAN-{gen}",
      "arch": "tiny",
      "params": 1490,
      "test_error": err,
      "test_accuracy": 1 - err,
      "objective": objective,
      "seed": seed + gen,
    }
    history = []
    for e in range(1, epochs + 1):
      h = {"epoch": e, "accuracy": float(rng.uniform(0.5, 0.9)), "loss": 1.0 / e}
      if val:
        h["val_accuracy"] = float(rng.uniform(0.5, 0.9))
      history.append(h)
    if val:
      g["val_accuracy"] = history[-1]["val_accuracy"]
    os.makedirs(os.path.join(path, f"gen_{gen}"))
    with open(os.path.join(path, f"gen_{gen}", "history.json"), "w") as f:
      json.dump(history, f)
    gens.append(g)
  ens = [
    {
      "name": "BANE-2",
      "members": [1, 2],
      "test_error": test_errors[3],
      "test_accuracy": 1 - test_errors[3],
    }
  ]
  os.makedirs(os.path.join(path, "ensemble_2"))
  with open(os.path.join(path, "results.json"), "w") as f:
    base = (
      None
      if baseline is None
      else {
        "gen": "baseline",
        "role": "baseline",
        "arch": "tiny",
        "params": 1490,
        "test_error": baseline,
        "test_accuracy": 1 - baseline,
      }
    )
    json.dump(
      {
        "generations": gens,
        "ensembles": ens,
        "baseline": base,
        "dataset": "fashion_mnist",
        "seed": seed,
      },
      f,
    )
  return path


def _assert_png(path):
  assert os.path.getsize(path) > 10000
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 300
    # Not a blank canvas: many distinct colours (curves, markers, text).
    assert len(set(im.convert("RGB").getdata())) > 50


def test_single_run_writes_table_and_png(tmp_path):
  run = _fake_run(str(tmp_path / "run"), 0, [0.071, 0.0653, 0.0641, 0.0598])
  out = report.write_report(run, hparams=False)
  _assert_png(out["png"])
  md = open(out["results_md"]).read()
  assert "| Teacher | tiny | 1.5k | 7.10 |  |" in md
  assert "| BAN-2 | tiny | 1.5k | 6.41 | -0.69 |" in md
  assert "| BANE-2 | ensemble of 1,2 |  | 5.98 | -1.12 |" in md


def test_curves_fall_back_to_train_accuracy(tmp_path):
  run = report.load_run(_fake_run(str(tmp_path / "run"), 0, [0.3, 0.2, 0.1, 0.05], val=False))
  epochs, err, source = report.curve(run.histories[1])
  assert source == "train"
  np.testing.assert_allclose(err, [100 * (1 - h["accuracy"]) for h in run.histories[1]])
  np.testing.assert_array_equal(epochs, [1, 2, 3])
  labels = report.plot([run], str(tmp_path / "r.png"))
  assert labels == [f"{n} (train: no val split)" for n in ("Teacher", "BAN-1", "BAN-2")]
  run_val = report.load_run(_fake_run(str(tmp_path / "run_val"), 0, [0.3, 0.2, 0.1, 0.05]))
  _, err, source = report.curve(run_val.histories[2])
  assert source == "val"
  np.testing.assert_allclose(err, [100 * (1 - h["val_accuracy"]) for h in run_val.histories[2]])


def test_parent_of_seed_runs_gives_mean_and_std(tmp_path):
  errs = {0: [0.10, 0.09, 0.085, 0.08], 1: [0.12, 0.10, 0.095, 0.09], 2: [0.11, 0.08, 0.09, 0.07]}
  for seed, e in errs.items():
    _fake_run(str(tmp_path / "seeds" / f"seed{seed}"), seed, e)
  parent = str(tmp_path / "seeds")
  runs = [report.load_run(p) for p in report.find_runs(parent)]
  agg = report.aggregate(runs)
  assert [a["key"] for a in agg] == ["Teacher", "BAN-1", "BAN-2", "BANE-2"]
  for i, a in enumerate(agg):
    values = [100 * errs[s][i] for s in sorted(errs)]
    assert a["mean"] == pytest.approx(statistics.mean(values))
    assert a["std"] == pytest.approx(statistics.stdev(values))
  out = report.write_report(parent, hparams=False)
  assert out["png"] == os.path.join(parent, "report.png")
  _assert_png(out["png"])
  md = open(out["results_md"]).read()
  ban1 = [errs[s][1] for s in sorted(errs)]
  assert (
    f"| BAN-1 | tiny | 1.5k | {100 * statistics.mean(ban1):.2f} ± {100 * statistics.stdev(ban1):.2f} |"
  ) in md


def test_cli_with_run_dirs_list(tmp_path):
  a = _fake_run(str(tmp_path / "a"), 0, [0.2, 0.18, 0.17, 0.16], baseline=0.19)
  b = _fake_run(str(tmp_path / "b"), 1, [0.22, 0.2, 0.15, 0.14], baseline=0.21)
  out_dir = str(tmp_path / "summary")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "ban_tf.report",
      f"--run_dirs={a},{b}",
      f"--out_dir={out_dir}",
      "--nohparams",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  _assert_png(os.path.join(out_dir, "report.png"))
  assert "| BANE-2 | ensemble of 1,2 |  | 15.00 ± 1.41 | -6.00 | 2 | 16.00, 14.00 |" in proc.stdout
  # The label-only baseline is a row of the summary too (it used to be dropped).
  assert "| Baseline | tiny | 1.5k | 20.00 ± 1.41 | -1.00 | 2 | 19.00, 21.00 |" in proc.stdout


def test_missing_results_is_a_usage_error(tmp_path):
  with pytest.raises(errors.UsageError, match="results.json"):
    report.write_report(str(tmp_path))


def test_summary_refuses_other_experiments_and_a_seed_twice(tmp_path):
  """A mean ± std over runs of different recipes, or over one run and its copy, is no seed spread."""
  a = _fake_run(str(tmp_path / "a"), 0, [0.2, 0.18, 0.17, 0.16])
  other = _fake_run(str(tmp_path / "other"), 1, [0.2, 0.18, 0.17, 0.16], epochs=1)
  with pytest.raises(errors.UsageError, match=r"different experiments \(--epochs 3 vs 1\)"):
    report.write_report([a, other], str(tmp_path / "out"), hparams=False)
  copy = _fake_run(str(tmp_path / "copy"), 0, [0.2, 0.18, 0.17, 0.16])
  with pytest.raises(errors.UsageError, match="both seed 0"):
    report.write_report([a, copy], str(tmp_path / "out"), hparams=False)
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
  # --seeds=2 --student_seed=11 writes seed_0 (students from 11) and seed_100 (from 111): one experiment.
  s0 = _fake_run(str(tmp_path / "s0"), 0, [0.2, 0.18, 0.17, 0.16], student_seed=11)
  s100 = _fake_run(str(tmp_path / "s100"), 100, [0.2, 0.18, 0.17, 0.16], student_seed=111)
  report.write_report([s0, s100], str(tmp_path / "out"), hparams=False)
  for path in (
    s0,
    s100,
  ):  # a key only an older config.json has (a flag since removed) is not compared
    cfg = json.load(open(os.path.join(path, "config.json")))
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(dict(cfg, removed_flag=path), f)
  report.write_report([s0, s100], str(tmp_path / "out"), hparams=False)
  s1 = _fake_run(str(tmp_path / "s1"), 1, [0.2, 0.18, 0.17, 0.16], student_seed=11)
  with pytest.raises(
    errors.UsageError, match=r"different experiments \(--student_seed seed\+11 vs seed\+10\)"
  ):
    report.write_report([s0, s1], str(tmp_path / "out2"), hparams=False)


def test_summary_row_of_one_run_shows_no_spread(tmp_path):
  """A row only one run has (more --gens in one seed) shows its value, not a '± 0.00' spread."""
  a = _fake_run(str(tmp_path / "a"), 0, [0.2, 0.18, 0.17, 0.16], baseline=0.19)
  b = _fake_run(str(tmp_path / "b"), 1, [0.22, 0.2, 0.15, 0.14])
  md = open(report.write_report([a, b], str(tmp_path / "out"), hparams=False)["results_md"]).read()
  assert "| Baseline | tiny | 1.5k | 19.00 (one run) | -2.00 | 1 | 19.00 |" in md
  assert "| BAN-1 | tiny | 1.5k | 19.00 ± 1.41 |" in md


def _session_hparams(logdir):
  """{name: value} of the (one) hparams session_start_info in `logdir`'s event files."""
  found = []
  for path in glob.glob(os.path.join(logdir, "*tfevents*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == hp_metadata.SESSION_START_INFO_TAG:
          info = hp_metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
          found.append(
            dict(
              {k: getattr(x, x.WhichOneof("kind")) for k, x in info.hparams.items()},
              _trial=info.group_name,
            )
          )
  assert len(found) == 1, found
  return found[0]


def test_image_folder_run_is_named_by_its_folder(tmp_path):
  """results.json, the HParams `dataset` and the trial id name an --image_folder run by the
  folder (Config.data_name), as the console and results.md do (once: "cifar10", the unused
  --dataset default)."""
  path = _fake_run(str(tmp_path / "run"), 3, [0.3, 0.25, 0.2, 0.15])
  cfg_path = os.path.join(path, "config.json")
  cfg = dict(json.load(open(cfg_path)), image_folder=str(tmp_path / "pets"))
  del cfg["dataset"]  # as --image_folder leaves it: the default
  json.dump(cfg, open(cfg_path, "w"))
  run = report.load_run(path)
  assert report.experiment_id(run.config).startswith("pets-tiny-ban-")
  report.write_hparams(run)
  hp = _session_hparams(os.path.join(path, "tb", "BAN-1"))
  assert hp["dataset"] == "pets" and hp["_trial"].startswith("pets-tiny-ban-"), hp
  results = json.load(open(os.path.join(path, "results.json")))
  report.write_results(path, results, config_lib.Config.from_dict(cfg))
  assert json.load(open(os.path.join(path, "results.json")))["dataset"] == "pets"
  assert open(os.path.join(path, "results.md")).read().startswith("# pets:")


def test_hparams_one_session_per_generation_and_ensemble(tmp_path):
  path = _fake_run(str(tmp_path / "run"), 3, [0.3, 0.25, 0.2, 0.15])
  run = report.load_run(path)
  report.write_hparams(run)
  report.write_hparams(run)  # a rerun replaces, not duplicates
  exp = report.experiment_id(run.config)
  for gen, role in enumerate(("Teacher", "BAN-1", "BAN-2")):
    hp = _session_hparams(os.path.join(path, "tb", role))  # TensorBoard runs named by row
    assert hp["gen"] == gen and hp["arch"] == "tiny" and hp["seed"] == 3
    assert hp["_trial"] == f"{exp}/seed_3/{role}"  # unique per experiment, seed and generation
    assert hp["loss"] == ("labels" if gen == 0 else "ban") and hp["temperature"] == 1.0
    # The experiment's flags, so rows of different experiments can be told apart and compared.
    assert hp["flag/lr"] == 0.1 and hp["flag/epochs"] == 3 and hp["flag/batch_size"] == 128
    assert (
      hp["flag/kd_weight"] == 1.0 and hp["flag/label_weight"] == 0.0 and hp["flag/loss"] == "ban"
    )
    assert hp["flag/lr_milestones"] == "0.3,0.6,0.8" and hp["experiment"] == exp
  hp = _session_hparams(os.path.join(path, "tb", "BANE-2"))
  assert hp["arch"] == "ensemble" and hp["role"] == "BANE-2" and hp["gen"] == 2
  assert hp["_trial"] == f"{exp}/seed_3/BANE-2"
  # The ensemble run carries the metric itself, as the generations' runs do.
  values = [
    float(tf.make_ndarray(v.tensor))
    for p in glob.glob(os.path.join(path, "tb", "BANE-2", "*"))
    for e in tf.compat.v1.train.summary_iterator(p)
    for v in e.summary.value
    if v.tag == "test/error"
  ]
  assert values == [pytest.approx(0.15)]
  # No events file in the run directory itself: TensorBoard shows no empty "." run.
  assert not glob.glob(os.path.join(path, "*tfevents*"))


def test_hparams_trials_differ_across_experiments_with_the_same_seeds(tmp_path):
  """Two --seeds=2 experiments under one logdir: 2 x 2 x 4 distinct trial ids (they used to merge)."""
  trials = set()
  for loss in ("ban", "cwtm"):
    for seed in (0, 100):
      path = _fake_run(str(tmp_path / loss / f"seed_{seed}"), seed, [0.3, 0.25, 0.2, 0.15])
      cfg = json.load(open(os.path.join(path, "config.json")))
      cfg["loss"] = loss
      json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
      report.write_hparams(report.load_run(path))
      for name in ("Teacher", "BAN-1", "BAN-2", "BANE-2"):
        trials.add(_session_hparams(os.path.join(path, "tb", name))["_trial"])
  assert len(trials) == 16, sorted(trials)


def test_results_md_states_data_epochs_seed_and_delta_legend(tmp_path):
  path = _fake_run(str(tmp_path / "run"), 7, [0.071, 0.0653, 0.0641, 0.0598])
  res = json.load(open(os.path.join(path, "results.json")))
  res["data"] = {"unit": "examples", "train": 768, "val": 256, "test": 10000}
  json.dump(res, open(os.path.join(path, "results.json"), "w"))
  md = open(report.write_report(path, hparams=False)["results_md"]).read()
  assert (
    "Data: fashion_mnist, 768 train / 256 val / 10000 test examples; 3 epochs per generation; seed 7."
    in md
  )
  assert "positive = worse" in md
  assert (
    json.load(open(os.path.join(path, "results.json")))["data"]["train"] == 768
  )  # kept on a redo


def test_plot_shows_baseline_and_seed_spread(tmp_path):
  runs = [
    report.load_run(
      _fake_run(
        str(tmp_path / f"s{seed}"),
        seed,
        [0.2 + seed / 100, 0.18, 0.17, 0.16],
        baseline=0.19 + seed / 100,
      )
    )
    for seed in (0, 1)
  ]
  legends = {}
  report.plot(runs, str(tmp_path / "r.png"), legends=legends)
  summary = " | ".join(legends["summary"])
  assert "Baseline" in summary and "mean ± std of 2 runs" in summary
  assert (
    legends["spread_points"] == 2 * 5
  )  # every run's value of Teacher, BAN-1, BAN-2, BANE-2, Baseline
