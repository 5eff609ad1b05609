"""Tests for ban_tf.report on small run directories written here (no training).

The end-to-end path (a real run writes its report) is in run_outputs_test.py.
"""

import glob
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats
import tensorflow as tf
from PIL import Image
from tensorboard.plugins.hparams import metadata as hp_metadata

from ban_tf import config as config_lib
from ban_tf import errors
from ban_tf import report
from ban_tf import tasks
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


@pytest.mark.slow
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


def test_summary_refuses_a_seed_twice_and_compares_other_experiments(tmp_path):
  """A mean ± std over one run and its copy is no seed spread; runs of different recipes on one
  test set are compared row by row (they used to be refused as "different experiments")."""
  a = _fake_run(str(tmp_path / "a"), 0, [0.2, 0.18, 0.17, 0.16])
  copy = _fake_run(str(tmp_path / "copy"), 0, [0.2, 0.18, 0.17, 0.16])
  with pytest.raises(errors.UsageError, match="both seed 0"):
    report.write_report([a, copy], str(tmp_path / "out"), hparams=False)
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
  other = _fake_run(str(tmp_path / "other"), 1, [0.3, 0.18, 0.17, 0.16], epochs=1)
  out = report.write_report([a, other], str(tmp_path / "out"), hparams=False)
  md = open(out["results_md"]).read()
  assert "- other: " in md and "--epochs 3 vs 1" in md  # what the second run changes
  # Different teachers (no shared gen_0 recorded): one Teacher row per run.
  assert "| Teacher (a) |" in md and "| Teacher (other) |" in md and "| BAN-1 (other) |" in md
  # --seeds=2 --student_seed=11 writes seed_0 (students from 11) and seed_100 (from 111): one experiment.
  s0 = _fake_run(str(tmp_path / "s0"), 0, [0.2, 0.18, 0.17, 0.16], student_seed=11)
  s100 = _fake_run(str(tmp_path / "s100"), 100, [0.2, 0.18, 0.17, 0.16], student_seed=111)
  report.write_report([s0, s100], str(tmp_path / "out2"), hparams=False)
  assert "± 0.00" in open(os.path.join(tmp_path, "out2", "results.md")).read()  # a seed summary
  for path in (
    s0,
    s100,
  ):  # a key only an older config.json has (a flag since removed) is not compared
    cfg = json.load(open(os.path.join(path, "config.json")))
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(dict(cfg, removed_flag=path), f)
  report.write_report([s0, s100], str(tmp_path / "out2"), hparams=False)
  assert len(report.group_experiments([report.load_run(p) for p in (s0, s100)])) == 1
  s1 = _fake_run(str(tmp_path / "s1"), 1, [0.2, 0.18, 0.17, 0.16], student_seed=11)
  assert report.experiment_diff(report.load_run(s0), report.load_run(s1)) == ["student_seed"]
  assert "--student_seed seed+11 vs seed+10" in report._shown(
    report.load_run(s0), report.load_run(s1), ["student_seed"]
  )


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


def _run(
  path, values, *, seed=0, metric="test_error", teacher_sha=None, data=None, baseline=None, **flags
):
  """A run dir with generations 0..len(values)-1 (and BANE-2 when there are 2 students), each
  row's `metric` from `values`; `teacher_sha`: its gen_0's fingerprint in manifest.json
  (the same in runs that share one --teacher); `flags`: its config.json."""
  os.makedirs(path)
  flags = dict(dict(dataset="fashion_mnist", arch="tiny", epochs=2), **flags)
  cfg = config_lib.Config(gens=len(values) - 1, seed=seed, run_dir=path, **flags)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)

  def entry(v, **more):
    return dict({metric: v, "arch": cfg.arch, "params": 1490}, **more)

  gens = [
    entry(v, gen=g, role="teacher" if g == 0 else f"BAN-{g}", seed=seed + g)
    for g, v in enumerate(values)
  ]
  ens = [dict(entry(values[-1] - 0.01), name="BANE-2", members=[1, 2])] if len(values) == 3 else []
  base = entry(baseline, gen="baseline", role="baseline") if baseline is not None else None
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(
      {"generations": gens, "ensembles": ens, "baseline": base, "seed": seed, "data": data}, f
    )
  if teacher_sha:
    with open(os.path.join(path, "manifest.json"), "w") as f:
      json.dump({"version": 1, "entries": {"gen_0": {"fingerprint_sha256": teacher_sha}}}, f)
  return path


_DATA = {"unit": "examples", "train": 500, "val": 0, "test": 1000}


def _table2_row(tmp_path, **ban_l_flags):
  """A Table 2 row: the teacher's run and two objectives taught by it (one with a Baseline)."""
  teacher = _run(str(tmp_path / "t2_tiny_teacher"), [0.30], teacher_sha="T", data=_DATA)
  common = dict(teacher=os.path.join(teacher, "gen_0"), teacher_sha="T", data=_DATA)
  ban = _run(str(tmp_path / "t2_tiny_ban"), [0.30, 0.25], loss="ban", **common)
  ban_l = _run(
    str(tmp_path / "t2_tiny_ban_l"),
    [0.30, 0.27],
    loss="ban_l",
    baseline=0.29,
    **dict(common, **ban_l_flags),
  )
  return teacher, ban, ban_l


def test_cross_objective_report_shares_the_teacher(tmp_path):
  """A Table 2 row from three runs (teacher, --loss=ban, --loss=ban_l with a different
  --train_examples, which changes nothing on test): one table, the shared teacher once."""
  runs = _table2_row(tmp_path, train_examples=400)
  out = report.write_report(list(runs), str(tmp_path / "row"), hparams=False)
  md = open(out["results_md"]).read()
  assert md.count("| Teacher") == 1, md
  # One model (the teacher's run and the two taught by it): no spread, said as a seeds summary says it.
  assert "| Teacher | tiny | 1.5k | 30.00 (one model, shared by 3 runs) |  |" in md
  assert "| BAN-1 (ban) | tiny | 1.5k | 25.00 | -5.00 |" in md
  assert "| BAN-1 (ban_l) | tiny | 1.5k | 27.00 | -3.00 |  |  | -2.00 |" in md  # vs its Baseline
  assert "| Baseline (ban_l) | tiny | 1.5k | 29.00 | -1.00 |" in md
  assert "- ban_l: " in md and "--loss ban vs ban_l" in md  # what the run changes (vs the first)
  res = json.load(open(os.path.join(tmp_path, "row", "results.json")))
  assert res["compared"] == list(runs) and res["metric"] == "test_error"
  by_name = {r["name"]: r for r in res["rows"]}
  assert set(by_name) == {"Teacher", "BAN-1 (ban)", "BAN-1 (ban_l)", "Baseline (ban_l)"}
  assert by_name["BAN-1 (ban)"]["teacher"] == "Teacher" and by_name["Teacher"]["n"] == 1
  assert by_name["Teacher"]["shared_by"] == 3 and "shared_by" not in by_name["BAN-1 (ban)"]
  assert by_name["BAN-1 (ban)"]["vs_teacher"] is None  # no stored per-example outputs here
  _assert_png(out["png"])
  # A rerun replaces the comparison; a run's or a --seeds summary's results.json is never replaced.
  report.write_report(list(runs), str(tmp_path / "row"), hparams=False)
  with pytest.raises(errors.UsageError, match="holds a run's results"):
    report.write_report(list(runs), runs[1], hparams=False)


def test_comparison_says_a_fixed_teacher_is_one_model_and_names_runs_one_way(tmp_path, monkeypatch):
  """A --seeds column that imported one fixed teacher, beside a run with its own teacher, given
  as a relative parent and an absolute run: its Teacher row says "(one model, shared by 2
  runs)" with Runs = 2, as the seeds summary does (it said Runs = 1 and nothing else), and the
  heading and results.json name every run by its absolute path (a --seeds parent was absolute,
  a single run as given)."""
  monkeypatch.chdir(tmp_path)
  for s in (0, 100):
    _run(
      f"x_fixed/seed_{s}",
      [0.30, 0.25 + s / 10000],
      seed=s,
      teacher="/t/gen_0",
      teacher_sha="F",
      data=_DATA,
    )
  _run("x_own", [0.31, 0.27], teacher_sha="O", data=_DATA, loss="ban_l", baseline=0.29)
  out = report.write_report(["x_fixed", "x_own"], "cmp", hparams=False)
  md = open(out["results_md"]).read()
  fixed, own = str(tmp_path / "x_fixed"), str(tmp_path / "x_own")
  assert f"- fixed: {fixed} (seeds 0, 100)\n" in md
  assert f"- own: {own} (seed 0; " in md
  lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
  assert lines["| Teacher (fixed)"] == (
    "| Teacher (fixed) | tiny | 1.5k | 30.00 (one model, shared by 2 runs) |  |  |  |  |  |  | 2 |"
  )
  assert lines["| Teacher (own)"].endswith("| 31.00 |  |  |  |  |  |  | 1 |")  # one run, one model
  assert lines["| BAN-1 (fixed)"].startswith("| BAN-1 (fixed) | tiny | 1.5k | 25.50 ± 0.71 |")
  res = json.load(open(tmp_path / "cmp" / "results.json"))
  assert res["compared"] == [fixed, own]
  rows = {r["name"]: r for r in res["rows"]}
  assert rows["Teacher (fixed)"]["shared_by"] == 2 and rows["Teacher (fixed)"]["n"] == 1
  assert rows["BAN-1 (fixed)"]["runs"] == [f"{fixed}/seed_0", f"{fixed}/seed_100"]
  assert rows["BAN-1 (own)"]["runs"] == [own] and "shared_by" not in rows["Teacher (own)"]


@pytest.mark.slow
def test_comparison_refuses_different_test_sets(tmp_path):
  teacher, ban, _ = _table2_row(tmp_path)
  other = _run(
    str(tmp_path / "other"), [0.3, 0.2], teacher_sha="T", data=_DATA, test_split="train[:10%]"
  )
  with pytest.raises(
    errors.UsageError, match=r"different test sets \(--test_split test vs train\[:10%\]\)"
  ):
    report.write_report([teacher, ban, other], str(tmp_path / "out"), hparams=False)
  proc = subprocess.run(  # the command: one error line, exit 2, nothing written
    [
      sys.executable,
      "-m",
      "ban_tf.report",
      f"--run_dirs={ban},{other}",
      f"--out_dir={tmp_path / 'out'}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 2 and len(errors_) == 1, proc.stderr[-2000:]
  assert "--test_split test vs train[:10%]" in errors_[0] and "Traceback" not in proc.stderr
  small = _run(str(tmp_path / "small"), [0.3, 0.2], data=dict(_DATA, test=500), loss="cwtm")
  with pytest.raises(errors.UsageError, match=r"different test sets \(test size 1000 vs 500\)"):
    report.write_report([ban, small], str(tmp_path / "out"), hparams=False)
  assert not os.path.exists(tmp_path / "out")  # refused before anything is written
  # A run and its copy inside a --seeds summary (the parent and one of its seed runs): still refused.
  seeds = tmp_path / "seeds"
  for s in (0, 100):
    _run(str(seeds / f"seed_{s}"), [0.3, 0.2], seed=s, loss="cwtm")
  with pytest.raises(errors.UsageError, match="both seed 0"):
    report.write_report([str(seeds), str(seeds / "seed_0"), ban], str(tmp_path / "out"))


def test_cross_objective_report_of_language_models(tmp_path):
  lm = dict(task="lm", dataset="tiny_shakespeare", arch="lstm-1-8", metric="test_perplexity")
  data = {"unit": "tokens", "train": 9000, "val": 900, "test": 1000}
  a = _run(str(tmp_path / "lm_ban"), [120.0, 110.0], teacher_sha="L", data=data, **lm)
  b = _run(
    str(tmp_path / "lm_ban_l"), [120.0, 115.5], teacher_sha="L", data=data, loss="ban_l", **lm
  )
  # Stored per-token NLLs (3 sentences of 4 tokens): Δ perplexity = exp(mean) - exp(mean).
  from ban_tf import predictions

  sentence = np.repeat(np.arange(3, dtype=np.int32), 4)
  nll = {
    (a, 0): np.full(12, 4.0),
    (b, 0): np.full(12, 4.0),
    (a, 1): np.full(12, 3.9),
    (b, 1): np.linspace(3.6, 4.6, 12),  # mean 4.1: worse on average, mixed per sentence
  }
  for (run, gen), v in nll.items():
    os.makedirs(os.path.join(run, f"gen_{gen}"), exist_ok=True)
    predictions.write(
      os.path.join(run, f"gen_{gen}"),
      {
        "test": {
          "nll": v.astype(np.float32),
          "labels": np.arange(12, dtype=np.int32),
          "sentence": sentence,
        }
      },
      task="lm",
    )
  md = open(report.write_report([a, b], str(tmp_path / "cmp"), hparams=False)["results_md"]).read()
  assert "Test perplexity" in md and md.count("| Teacher") == 1
  rows = {
    r["name"]: r for r in json.load(open(os.path.join(tmp_path, "cmp", "results.json")))["rows"]
  }
  for run, name in ((a, "BAN-1 (ban)"), (b, "BAN-1 (ban_l)")):
    golden = math.exp(float(np.mean(nll[(run, 1)].astype(np.float32)))) - math.exp(4.0)
    assert rows[name]["vs_teacher"]["delta"] == pytest.approx(golden, rel=1e-4), name
  # Every token better, but 3 sentences: the sign-flip test over sentences cannot reject at 5%
  # (its smallest two-sided p is 2/2^3), so no verdict; the CI alone excludes 0.
  ban = rows["BAN-1 (ban)"]["vs_teacher"]
  assert ban["ci95"][1] < 0 and ban["p"] > 0.05 and ban["verdict"] == "no difference detected"
  assert "| BAN-1 (ban_l) | lstm-1-8 | 1.5k | 115.50 | " in md
  c = _run(
    str(tmp_path / "lm_vocab"), [90.0, 80.0], teacher_sha="M", data=data, vocab_size=50, **lm
  )
  with pytest.raises(errors.UsageError, match=r"different test sets \(--vocab_size 0 vs 50\)"):
    report.write_report([a, c], str(tmp_path / "cmp2"), hparams=False)
  with pytest.raises(errors.UsageError, match="mix tasks"):
    report.write_report([a, _table2_row(tmp_path)[1]], str(tmp_path / "cmp3"), hparams=False)


def test_group_labels_strip_what_the_names_share(tmp_path):
  def labels(paths):
    groups = [report.Group([], p) for p in paths]
    return [g.label for g in report.group_labels(groups)]

  assert labels(["r/table2_d-80_teacher", "r/table2_d-80_ban", "r/table2_d-80_ban_l"]) == [
    "teacher",
    "ban",
    "ban_l",
  ]
  assert labels(["r/cifar10-tiny-ban-seed0", "r/cifar10-tiny-kd-seed0"]) == ["ban", "kd"]
  assert labels(["x/ban/seeds", "y/cwtm/seeds"]) == ["x/ban", "y/cwtm"]  # same names: paths
  assert labels(["a/run"]) == ["run"]


def _vs(delta, lo, hi, verdict):
  return {"delta": delta, "ci95": [lo, hi], "p": 0.01, "n": 1000, "method": "m", "verdict": verdict}


def _with_comparisons(path):
  """Adds vs_teacher to BAN-1 (better), BAN-2 (no difference) and BANE-2 (worse) of a _fake_run."""
  res = json.load(open(os.path.join(path, "results.json")))
  res["generations"][1]["vs_teacher"] = _vs(-2.0, -3.0, -1.0, "better")
  res["generations"][2]["vs_teacher"] = _vs(-0.5, -1.5, 0.5, "no difference detected")
  res["ensembles"][0]["vs_teacher"] = _vs(1.0, 0.25, 2.0, "worse")
  json.dump(res, open(os.path.join(path, "results.json"), "w"))
  return path


def _scalars(logdir, tag):
  """{step: value} of `tag` in logdir's event files."""
  out = {}
  for p in glob.glob(os.path.join(logdir, "*tfevents*")):
    for e in tf.compat.v1.train.summary_iterator(p):
      for v in e.summary.value:
        if v.tag == tag:
          out[e.step] = float(tf.make_ndarray(v.tensor))
  return out


def test_tensorboard_series_over_generations_text_and_shown_columns(tmp_path):
  from tensorboard.plugins.hparams import backend_context

  path = _with_comparisons(
    _fake_run(str(tmp_path / "run"), 0, [0.3, 0.25, 0.2, 0.15], baseline=0.28)
  )
  run = report.load_run(path)
  report.write_hparams(run)
  report.write_hparams(run)  # a rerun replaces, not appends
  tb = lambda name: os.path.join(path, "tb", name)  # noqa: E731
  tag = "by_generation/test_error"
  assert _scalars(tb("generations"), tag) == pytest.approx({0: 30.0, 1: 25.0, 2: 20.0})
  assert _scalars(tb("ensembles"), tag) == pytest.approx({2: 15.0})
  assert _scalars(tb("baseline"), tag) == pytest.approx({1: 28.0})
  delta = "by_generation/delta_vs_teacher"
  assert _scalars(tb("generations"), delta) == pytest.approx({1: -2.0, 2: -0.5})
  assert _scalars(tb("generations_ci95_low"), delta) == pytest.approx({1: -3.0, 2: -1.5})
  assert _scalars(tb("generations_ci95_high"), delta) == pytest.approx({1: -1.0, 2: 0.5})
  assert _scalars(tb("ensembles_ci95_high"), delta) == pytest.approx({2: 2.0})
  texts = [
    tf.make_ndarray(v.tensor).item().decode()
    for p in glob.glob(os.path.join(tb("generations"), "*tfevents*"))
    for e in tf.compat.v1.train.summary_iterator(p)
    for v in e.summary.value
    if v.tag == "results"
  ]
  row = "| BAN-2 | tiny | 1.5k | 20.00 | -0.50 [-1.50, +0.50] | 0.010 | no difference detected |"
  assert len(texts) == 1 and row in texts[0], texts
  # HParams: the experiment marks role, gen (and loss, seed, experiment) `differs`; TensorBoard's
  # backend sorts differing hparams first and its dashboard shows the first 5 columns.
  infos = []
  for p in glob.glob(os.path.join(tb("BAN-1"), "*tfevents*")):
    for e in tf.compat.v1.train.summary_iterator(p):
      for v in e.summary.value:
        if v.tag == hp_metadata.EXPERIMENT_TAG:
          infos.append(hp_metadata.parse_experiment_plugin_data(v.metadata.plugin_data.content))
  assert len(infos) == 1
  backend_context._sort_and_reduce_to_hparams_limit(infos[0])
  shown = [i.name for i in infos[0].hparam_infos][:5]
  assert {"role", "gen", "loss", "experiment", "seed"} == set(shown), shown


def test_plot_draws_ci_and_verdict(tmp_path):
  run = report.load_run(
    _with_comparisons(_fake_run(str(tmp_path / "run"), 0, [0.3, 0.25, 0.2, 0.15]))
  )
  legends = {}
  report.plot([run], str(tmp_path / "r.png"), legends=legends)
  assert legends["deltas"] == {
    "BAN-1": pytest.approx((-2.0, -3.0, -1.0, "better")),
    "BAN-2": pytest.approx((-0.5, -1.5, 0.5, "no difference detected")),
    "BANE-2": pytest.approx((1.0, 0.25, 2.0, "worse")),
  }
  rows = [
    dict(name="Teacher", key="Teacher", mean=30.0, std=0.0, vs_teacher=None),
    dict(name="BAN-1 (ban)", key="BAN-1", mean=25.0, std=1.5, vs_teacher=_vs(-5, -6, -4, "better")),
    dict(
      name="BAN-1 (kd)",
      key="BAN-1",
      mean=31.0,
      std=0.0,
      vs_teacher=_vs(1, None, None, "no difference detected"),
    ),
  ]
  legends = {}
  report.plot_comparison(rows, str(tmp_path / "c.png"), tasks.get("image"), legends=legends)
  assert legends["values"] == {
    "Teacher": pytest.approx((30.0, 0.0)),
    "BAN-1 (ban)": pytest.approx((25.0, 1.5)),
    "BAN-1 (kd)": pytest.approx((31.0, 0.0)),
  }
  assert legends["deltas"] == {
    "BAN-1 (ban)": pytest.approx((-5.0, -6.0, -4.0, "better")),
    "BAN-1 (kd)": (1.0, None, None, "no difference detected"),  # an undefined CI: a bare point
  }
  _assert_png(str(tmp_path / "c.png"))


def _store(run, gen, correct):
  """gen_<gen>/predictions.npz of an image model right exactly where `correct` (labels all 0)."""
  from ban_tf import predictions

  correct = np.asarray(correct, dtype=bool)
  predicted = np.where(correct, 0, 1).astype(np.int32)
  probs = np.eye(10, dtype=np.float16)[predicted]
  os.makedirs(os.path.join(run, f"gen_{gen}"), exist_ok=True)
  predictions.write(
    os.path.join(run, f"gen_{gen}"),
    {
      "test": {
        "probabilities": probs,
        "labels": np.zeros(len(correct), np.int32),
        "predicted": predicted,
      }
    },
    task="image",
  )


def test_outputs_without_the_test_split_are_a_usage_error(tmp_path):
  """A predictions.npz that holds only val outputs (replaced by hand) is an error naming the fix,
  not a row silently left without its paired statistics."""
  from ban_tf import predictions

  _, ban, _ = _table2_row(tmp_path)
  n = 200
  _store(ban, 0, np.arange(n) < 150)
  _store(ban, 1, np.arange(n) < 140)
  d = os.path.join(ban, "gen_1")
  predictions.write(d, {"val": predictions.read(d)["test"]}, task="image")
  with pytest.raises(errors.UsageError, match="holds no test outputs.*delete it"):
    report.write_report(ban, hparams=False)


def test_cross_objective_report_pairs_each_row_with_the_shared_teacher(tmp_path):
  """Rows of two objectives against their one teacher, from stored per-example outputs:
  Δ and the exact McNemar p against an independent computation (math.comb), and the
  over-seed interval of a --seeds column."""
  n = 200
  idx = np.arange(n)
  teacher_ok = idx < 150  # 25% error
  ban_ok = (idx < 140) | ((idx >= 150) & (idx < 180))  # b = 10 lost, c = 30 gained: 15% error
  ban_l_ok = (idx < 149) | (idx == 150)  # b = 1, c = 1: 25% error
  teacher, ban, ban_l = _table2_row(tmp_path)
  for run in (teacher, ban, ban_l):
    _store(run, 0, teacher_ok)
  _store(ban, 1, ban_ok)
  _store(ban_l, 1, ban_l_ok)
  seeds = tmp_path / "t2_tiny_cwtm"  # a --seeds=2 column: per-seed deltas -8 and -2 points
  for s, gained in ((0, 16), (100, 4)):
    path = _run(
      str(seeds / f"seed_{s}"),
      [0.25, 0.25 - gained / n],
      seed=s,
      loss="cwtm",
      teacher=os.path.join(teacher, "gen_0"),
      teacher_sha="T",
      data=_DATA,
    )
    _store(path, 0, teacher_ok)
    _store(path, 1, teacher_ok | (idx >= 200 - gained))
  out = report.write_report([teacher, ban, ban_l, str(seeds)], str(tmp_path / "row"))
  res = json.load(open(os.path.join(tmp_path, "row", "results.json")))
  rows = {r["name"]: r for r in res["rows"]}
  vs = rows["BAN-1 (ban)"]["vs_teacher"]
  golden_p = 2 * sum(math.comb(40, k) for k in range(11)) / 2**40  # McNemar: 10 of 40 discordant
  assert vs["delta"] == pytest.approx(-10.0) and vs["p"] == pytest.approx(golden_p, rel=1e-9)
  assert vs["verdict"] == "better" and vs["ci95"][1] < 0 and vs["n"] == n
  vs = rows["BAN-1 (ban_l)"]["vs_teacher"]
  assert vs["delta"] == 0.0 and vs["p"] == 1.0 and vs["verdict"] == "no difference detected"
  assert vs["ci95"][0] < 0 < vs["ci95"][1]
  vs = rows["BAN-1 (cwtm)"]["vs_teacher"]
  half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev([-8.0, -2.0]) / math.sqrt(2)
  assert vs["delta"] == pytest.approx(-5.0) and vs["n"] == 2
  assert vs["ci95"] == pytest.approx([-5.0 - half, -5.0 + half])
  assert rows["Teacher"]["vs_teacher"] is None and rows["BAN-1 (cwtm)"]["teacher"] == "Teacher"
  md = open(out["results_md"]).read()
  assert md.count("| Teacher") == 1
  assert f"| BAN-1 (ban) | tiny | 1.5k | 25.00 | -10.00 [{vs_ci(rows['BAN-1 (ban)'])}] |" in md
  assert "| no difference detected |" in md and "Verdict:" in md  # the legend line
  # Each row's method is named under the table (one-seed rows and the --seeds column differ).
  assert f"- BAN-1 (ban), BAN-1 (ban_l): {rows['BAN-1 (ban)']['vs_teacher']['method']}\n" in md
  cwtm = rows["BAN-1 (cwtm)"]["vs_teacher"]
  assert f"- BAN-1 (cwtm): {cwtm['method']} (" in md and cwtm["includes"] in md
  # TensorBoard: each compared run's rows over the generation index, from the shared teacher.
  tb = os.path.join(tmp_path, "row", "tb")
  assert _scalars(os.path.join(tb, "ban", "generations"), "by_generation/test_error") == (
    pytest.approx({0: 30.0, 1: 25.0})
  )
  assert _scalars(os.path.join(tb, "cwtm", "generations"), "by_generation/test_error") == (
    pytest.approx({0: 30.0, 1: 20.0})  # the mean over its seeds
  )
  delta = "by_generation/delta_vs_teacher"
  assert _scalars(os.path.join(tb, "ban", "generations"), delta) == pytest.approx({1: -10.0})
  lo, hi = rows["BAN-1 (ban)"]["vs_teacher"]["ci95"]
  assert _scalars(os.path.join(tb, "ban", "generations_ci95_low"), delta) == pytest.approx({1: lo})
  assert _scalars(os.path.join(tb, "ban", "generations_ci95_high"), delta) == pytest.approx({1: hi})
  texts = [
    tf.make_ndarray(v.tensor).item().decode()
    for p in glob.glob(os.path.join(tb, "comparison", "*tfevents*"))
    for e in tf.compat.v1.train.summary_iterator(p)
    for v in e.summary.value
    if v.tag == "comparison"
  ]
  assert len(texts) == 1 and "| BAN-1 (ban) | tiny | 1.5k | 25.00 | -10.00 [" in texts[0]


def vs_ci(row):
  lo, hi = row["vs_teacher"]["ci95"]
  return f"{lo:+.2f}, {hi:+.2f}"


class _StubImages:
  """The data set `tasks.get("image").load_data` returns for a fabricated run (tests/fabricate.py's
  4x4x1 inputs, 3 classes): 60 test examples, no validation split."""

  def __init__(self, n=60):
    rng = np.random.default_rng(0)
    self.x = rng.uniform(0, 255, (n, 4, 4, 1)).astype(np.float32)
    self.y = rng.integers(0, 3, n).astype(np.int32)

  def test(self, batch_size):
    ds = tf.data.Dataset.from_tensor_slices((self.x, self.y, np.ones(len(self.y), np.float32)))
    return ds.batch(batch_size)

  def val(self, batch_size):
    del batch_size
    return None


@pytest.mark.slow
def test_evaluate_prints_the_reports_comparisons(tmp_path, monkeypatch, capsys):
  """`ban_tf.evaluate --run_dir` prints each row's Δ vs teacher (and vs baseline) with its 95% CI,
  p and verdict, the cells results.md has, and the method/legend lines (it printed the plain
  difference of the two errors: "-5.00", no CI, p or verdict)."""
  import types  # pylint: disable=g-import-not-at-top

  from ban_tf import evaluate  # pylint: disable=g-import-not-at-top
  from tests import fabricate  # pylint: disable=g-import-not-at-top

  run = fabricate.finished_run(str(tmp_path / "run"), gens=2, baseline=True)
  monkeypatch.setattr(tasks.get("image"), "load_data", lambda cfg: _StubImages())
  fv = types.SimpleNamespace(
    run_dir=run, saved_model=None, split=None, data_dir=None, batch_size=0, output_json=None
  )
  evaluate.main(["evaluate"], fv)  # computes the outputs the fabricated run lacks, then compares
  out = capsys.readouterr().out
  md = open(report.write_report(run, hparams=False)["results_md"]).read()

  def cells(text):
    """{row: its Δ, p and verdict cells (vs teacher, vs baseline)} of a results table."""
    rows = [
      [c.strip() for c in line.strip().strip("|").split("|")]
      for line in text.splitlines()
      if line.startswith("| ")
    ]
    head = rows[0]
    start = head.index("Δ vs teacher [95% CI]")
    return {r[0]: r[start : start + 6] for r in rows[1:]}, head[start : start + 6]

  got, head = cells(out)
  want, want_head = cells(md)
  assert (
    head
    == want_head
    == ["Δ vs teacher [95% CI]", "p", "vs teacher"]
    + [
      "Δ vs baseline [95% CI]",
      "p",
      "vs baseline",
    ]
  )
  assert set(got) == {"Teacher", "BAN-1", "BAN-2", "BANE-2"}
  for row, c in got.items():
    assert c == want[row], row
  assert got["BAN-1"][0].count("[") == 1 and got["BAN-1"][2] in report.VERDICT_STYLE
  note = report.comparisons_note(json.load(open(os.path.join(run, "results.json"))))
  assert note and note in out  # the method and legend lines, as under results.md's table
