"""Run reports: results.md, report.png and TensorBoard hparams from finished run dirs.

  python -m ban_tf.report --run_dir=runs/cifar10-wrn-28-1-ban-seed0
  python -m ban_tf.report --run_dir=runs/seeds        # a parent of seed runs: mean and std
  python -m ban_tf.report --run_dirs=runs/s0,runs/s1 --out_dir=runs/summary

Everything is read from what a run leaves on disk (config.json, results.json,
gen_k/history.json), so a report can be redone at any time; generations.run calls
`write_report` when a run finishes. Several runs (seeds) are summarised by the
mean and the sample standard deviation (ddof=1) of each model's headline metric
(the task's: test error, or test perplexity; results.py).
"""

import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")  # no display: write files only

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top,wrong-import-position

from ban_tf import checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import manifest  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import predictions  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import rundir  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import stats  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

PNG = "report.png"
HPARAMS_SUFFIX = ".hparams"  # event files written here; replaced, not appended, on a rerun
SERIES_SUFFIX = ".series"  # the generation series' event files: replaced on every report too
HPARAM_NAMES = ("gen", "role", "arch", "loss", "temperature", "seed", "dataset")
METRICS = ("test/error", "test/accuracy")


@dataclasses.dataclass
class Run:
  """One run directory as read back from disk."""

  path: str
  config: dict
  results: dict
  histories: dict  # gen -> list of per-epoch dicts (history.json)


def load_run(path):
  """Reads a run directory; raises errors.UsageError when it holds no results."""
  files = rundir.RunFiles(path)
  res_path = files.results_path
  if not os.path.exists(res_path):
    raise errors.UsageError(
      f"{path} has no results.json: pass a run directory whose first generation finished"
    )
  cfg_path = files.config_path
  cfg = export.read_json_checked(cfg_path, "restore it") if os.path.exists(cfg_path) else {}
  results = export.read_json_checked(
    res_path, "rerun the training command to rebuild it from the generations"
  )
  if "generations" not in results:
    raise errors.UsageError(
      f"{path} holds the summary of several runs, not one run: pass it as --run_dir"
    )
  _check_numbers(res_path, results)
  histories = {}
  for g in results["generations"]:
    model = files.generation(g["gen"])
    if os.path.exists(model.history_path):
      try:
        histories[g["gen"]] = export.read_json_checked(
          model.history_path, "its curve is left out", expect=list
        )
      except errors.UsageError as e:
        logging.warning("%s", e)
  return Run(path, cfg, results, histories)


# The rows' fields that are numbers (or null); anything else in them is a damaged results.json.
_NUMBER_KEYS = ("params", "epochs", "seconds")
_NUMBER_SUFFIXES = ("_accuracy", "_error", "_perplexity", "_loss")


def _check_numbers(path, results):
  """Raises errors.RunDirError naming the first row field of results.json that should be a
  number and is not (e.g. "test_error": "abc"), instead of a ValueError deep in a table."""
  rows = list(results.get("generations") or []) + list(results.get("ensembles") or [])
  rows += [results["baseline"]] if isinstance(results.get("baseline"), dict) else []
  for row in rows:
    if not isinstance(row, dict):
      raise errors.RunDirError(
        f"{path} is damaged (a row is {type(row).__name__}, not an object): rerun the training "
        "command to rebuild it from the generations"
      )
    for key, value in row.items():
      numeric = key in _NUMBER_KEYS or key.endswith(_NUMBER_SUFFIXES)
      if (
        numeric
        and value is not None
        and (isinstance(value, bool) or not isinstance(value, (int, float)))
      ):
        name = row.get("name") or row.get("role") or row.get("gen")
        raise errors.RunDirError(
          f"{path} is damaged ({name}'s {key} is {value!r}, not a number): rerun the training "
          "command to rebuild it from the generations"
        )


def _is_single_run(path):
  """A run directory (its results.json has generations), not a --seeds parent's summary."""
  res_path = rundir.RunFiles(path).results_path
  return os.path.exists(res_path) and "generations" in export.read_json_checked(
    res_path, "rerun the training command to rebuild it from the generations"
  )


def find_runs(path):
  """`path` itself when it is a run directory, else its sub-directories that are
  (the seed_S/ runs of a --seeds parent, or any parent of run directories)."""
  if _is_single_run(path):
    return [path]
  subs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", layout.RESULTS_JSON)))
  subs = [p for p in subs if _is_single_run(p)]
  if not subs:
    raise errors.UsageError(
      f"{path} holds no results.json, nor do its sub-directories: pass a run directory"
    )
  return subs


def config_from_dict(d):
  """The Config stored in config.json (unknown keys, e.g. `resolved`, dropped)."""
  return config_lib.Config.from_dict(d)


def task_of(runs):
  """The task of the runs (config.json's `task`; runs written before --task existed are image runs)."""
  names = {r.config.get("task", "image") for r in runs}
  if len(names) > 1:
    raise errors.UsageError(
      f"the runs mix tasks ({', '.join(sorted(names))}): report one task at a time"
    )
  return tasks.get(names.pop())


def _student_offset(config):
  """--student_seed relative to the base seed (None: the default, seed + 1)."""
  student, seed = config.get("student_seed"), config.get("seed", 0)
  return None if student is None else student - seed


def experiment_diff(a, b):
  """The flags that make runs `a` and `b` different experiments (not seeds of one).

  config.json compared but for the seed, --student_seed moved with it as --seeds does,
  --baseline and what may change on resume (config.NON_EXPERIMENT_FIELDS); a key only
  an older config.json has is not compared.
  """
  first = config_from_dict(a.config)
  known = set(first.to_dict())
  diff = [
    k
    for k in first.experiment_diff(b.config)
    if k in known and k not in ("seed", "baseline", "resolved", "student_seed")
  ]
  if _student_offset(a.config) != _student_offset(b.config):  # --seeds moves it with the seed
    diff.append("student_seed")
  return diff


def _flag_value(config, k):
  if k != "student_seed":
    return config.get(k)
  off = _student_offset(config)
  return "seed+1" if off is None else f"seed{off:+d}"


def _shown(a, b, keys):
  def show(config, k):
    v = _flag_value(config, k)
    return "(none)" if v is None or v == "" else v

  return ", ".join(f"--{k} {show(a.config, k)} vs {show(b.config, k)}" for k in keys[:3])


def _check_seeds_once(runs):
  """Raises errors.UsageError when two runs of one experiment have the same seed (a run and its copy)."""
  seen = {}
  for r in runs:
    seed = r.config.get("seed")
    if seed is not None and seed in seen:
      raise errors.UsageError(
        f"{seen[seed]} and {r.path} are both seed {seed} (the same run twice?): "
        "pass each seed's run once"
      )
    seen[seed] = r.path


def test_set_diff(a, b):
  """What makes the test examples of runs `a` and `b` differ: [(what, value in a, value in b)].

  The task's `test_set_fields` of config.json (an older config.json: their defaults),
  and the test size and unit results.json records (when both runs record them).
  Empty: both were scored on the same test examples, so their rows pair example by example.
  """
  out = []
  ta, tb = a.config.get("task", "image"), b.config.get("task", "image")
  if ta != tb:
    return [("--task", ta, tb)]
  fields = set(tasks.get(ta).test_set_fields)
  for k in config_from_dict(a.config).experiment_diff(b.config):
    if k in fields:
      defaults = config_lib.Config().to_dict()
      out.append((f"--{k}", a.config.get(k, defaults.get(k)), b.config.get(k, defaults.get(k))))
  da, db = a.results.get("data") or {}, b.results.get("data") or {}
  for k in ("test", "unit"):
    if k in da and k in db and da[k] != db[k]:
      out.append((f"test {'size' if k == 'test' else 'unit'}", da[k], db[k]))
  return out


def check_one_test_set(runs):
  """Raises errors.UsageError (naming the difference) unless every run was scored on runs[0]'s test set."""
  for r in runs[1:]:
    diff = test_set_diff(runs[0], r)
    if diff:
      shown = ", ".join(f"{k} {va} vs {vb}" for k, va, vb in diff[:3])
      raise errors.UsageError(
        f"{runs[0].path} and {r.path} were scored on different test sets ({shown}): "
        "compare runs of one test set (the same data set, test split, sizes and image size)"
      )


@dataclasses.dataclass
class Group:
  """The seeds of one experiment among the runs of a report.

  path: the run directory, or the common parent of its seed runs (absolute).
  label: how its rows are told apart in a comparison (`group_labels`).
  """

  runs: list
  path: str
  label: str = ""


def group_experiments(runs):
  """Groups runs into experiments (`experiment_diff` empty within a group), in the order given.

  Raises:
    errors.UsageError: two runs of one experiment have the same seed.
  """
  groups = []
  for r in runs:
    for g in groups:
      if not experiment_diff(g[0], r):
        g.append(r)
        break
    else:
      groups.append([r])
  out = []
  for g in groups:
    _check_seeds_once(g)
    # Absolute, however the runs were given (relative, absolute, a parent or its seed runs): a
    # comparison's heading and results.json name every run one way, valid from any directory.
    path = os.path.commonpath([os.path.abspath(r.path) for r in g])
    out.append(Group(g, path))
  return out


_SEPARATORS = "_-./ "


def _strip_common(names, reverse=False):
  """`names` without the longest common prefix (suffix) that ends at a separator and leaves each non-empty."""
  seq = [n[::-1] for n in names] if reverse else list(names)
  common, shortest, cut = os.path.commonprefix(seq), min(len(n) for n in seq), 0
  for i, ch in enumerate(common):
    if ch in _SEPARATORS and i + 1 < shortest:
      cut = i + 1
  seq = [n[cut:] for n in seq]
  return [n[::-1] for n in seq] if reverse else seq


def group_labels(groups):
  """Sets each group's label: its directory's name without the prefix and suffix all the compared
  directories' names share (table2_densenet-80-80_ban_l -> ban_l; cifar10-tiny-kd-seed0 -> kd).

  Names that are not unique are replaced by their paths relative to the groups' common parent.
  """
  names = [os.path.basename(os.path.normpath(g.path)) for g in groups]
  if len(set(names)) < len(names):
    root = os.path.commonpath([os.path.abspath(g.path) for g in groups])
    names = [os.path.relpath(os.path.abspath(g.path), root).replace(os.sep, "/") for g in groups]
  if len(groups) > 1:
    names = _strip_common(_strip_common(names), reverse=True)
  for g, name in zip(groups, names):
    g.label = name
  return groups


def teacher_id(run):
  """The run's generation 0 as a model: its manifest's fingerprint_sha256 (what the SavedModel
  computes; a --teacher copy of a generation has its source's), else metrics.json's
  weights_sha256; None when neither is recorded (then it is not matched across runs)."""
  try:
    entry = manifest.read(run.path).get(layout.model_name(0), {})
  except errors.UsageError:
    entry = {}
  if entry.get("fingerprint_sha256"):
    return entry["fingerprint_sha256"]
  gen0 = next((g for g in run.results.get("generations", []) if g.get("gen") == 0), {})
  return gen0.get("weights_sha256")


def compare(groups, task):
  """The rows of a comparison of several experiments scored on one test set.

  Each group's rows (`aggregate` over its seeds) are named "<row> (<group label>)".
  Teacher rows of groups whose generation 0 is the same model (`teacher_id`: one set of
  models) are one row, shown once (with one model in it: its value, n = 1, and
  `shared_by` = the number of runs whose gen_0 it is, when more than one); when the
  table has one Teacher row it is named "Teacher". Each row carries `vs_teacher`
  (against its run's gen_0: the shared Teacher row's model when it is shared) and
  `vs_baseline` (against its run's Baseline): one run, the paired comparison over the
  test examples its results.json holds (`attach_comparisons`); several seeds, the
  over-seed interval of those (`aggregate`); None without stored per-example outputs.

  Returns:
    [{"name", "key", "run" (group label), "runs" (absolute paths), "arch", "params", "n",
      "metric", "mean", "std", "values", "teacher" (its reference row's name), "vs_teacher",
      "vs_baseline"}], and "shared_by" on a Teacher row that is one model of several runs.
  """
  out, teacher_of, shared = [], {}, {}
  for g in groups:
    ids = frozenset(teacher_id(r) for r in g.runs)
    known = None not in ids
    own = {r.key: r.entry for r in results_lib.rows(g.runs[0].results)}
    for a in aggregate(g.runs, task.headline):
      row = {k: v for k, v in a.items() if not k.startswith("deltas_") and k != "shared"}
      row.update(
        name=a["name"].replace(a["key"], f"{a['key']} ({g.label})", 1),
        run=g.label,
        runs=[os.path.abspath(r.path) for r in g.runs],
      )
      for field, _ in results_lib.REFERENCES:
        row[field] = (
          own.get(a["key"], {}).get(field) if len(g.runs) == 1 else a.get(field)
        ) or None
      if a["key"] == "Teacher":
        if known and ids in shared:
          teacher_of[id(g)] = shared[ids]
          if "shared_by" in shared[ids]:
            shared[ids]["shared_by"] += len(g.runs)
          continue  # the same model as an earlier group's Teacher row
        if known and len(ids) == 1:  # one model, however many seeds imported it
          row.update(
            n=1, std=0.0, values=row["values"][:1], mean=row["values"][0], shared_by=len(g.runs)
          )
        teacher_of[id(g)] = row
        if known:
          shared[ids] = row
      out.append((row, g))
  teacher_rows = {id(t): t for t in teacher_of.values()}
  if len(teacher_rows) == 1:
    only = next(iter(teacher_rows.values()))
    only["name"] = only["name"].replace(f"Teacher ({only['run']})", "Teacher", 1)
  for row, g in out:
    row["teacher"] = teacher_of[id(g)]["name"] if id(g) in teacher_of else None
    if row.get("shared_by", 0) < 2:
      row.pop("shared_by", None)  # one model in one run: nothing shared
  return [row for row, _ in out]


def teacher_sharing(runs):
  """(shared, includes): whether every run's gen_0 is the same imported model (the sha256 of
  its --teacher source in gen_0/metrics.json), and what an over-seed interval vs the teacher
  therefore covers, in words."""
  sources = []
  for r in runs:
    try:
      m = export.read_json(os.path.join(r.path, layout.model_name(0), layout.METRICS))
    except (OSError, ValueError):
      m = {}
    src = m.get(checks.SOURCE_KEY) if isinstance(m, dict) else None
    sources.append(src.get("sha256") if isinstance(src, dict) else None)
  n = len(runs)
  if n > 1 and sources[0] is not None and len(set(sources)) == 1:
    return True, (
      f"one fixed teacher shared by all {n} seed runs (their gen_0 is the same imported "
      "model): the interval covers the students' seed variance, not the teacher's"
    )
  if any(sources):
    return False, (
      "each seed run imported its own teacher: the interval covers teacher and student variance"
    )
  return False, (
    "each seed run trained its own teacher: the interval covers teacher and student seed variance"
  )


def aggregate(runs, metric=None):
  """results.aggregate of the runs' `metric` (default: their task's headline), with the
  over-seed comparisons: per row, `vs_teacher` / `vs_baseline` = stats.over_seeds of the
  runs' paired deltas (when every run has one), and `shared` on the Teacher row when all
  runs share one imported teacher (teacher_sharing)."""
  metric = metric or task_of(runs).headline
  agg = results_lib.aggregate([r.results for r in runs], metric)
  shared, includes = teacher_sharing(runs)
  for a in agg:
    if a["key"] == "Teacher" and shared:
      a["shared"] = True
    for field, ref in results_lib.REFERENCES:
      deltas = a.get(f"deltas_{field}") or []
      if deltas and len(deltas) == a["n"]:
        what = includes if ref == "teacher" else "row and Baseline retrained per seed; " + includes
        a[field] = stats.over_seeds(deltas, includes=what).to_json()
  return agg


def model_dirs(run_path, results):
  """[(row key, manifest name, directory, serves probabilities)] of a run's finished models."""
  out = []
  for g in results.get("generations", []):
    out.append((results_lib.generation_name(g["gen"]), layout.model_name(g["gen"]), False))
  for e in results.get("ensembles", []):
    key = e.get("name") or f"BANE-{max(e['members'])}"
    out.append((key, layout.numbered(layout.ENSEMBLE, key.split("-")[1]), True))
  if results.get("baseline"):
    out.append(("Baseline", "baseline", False))
  return [(key, name, os.path.join(run_path, name), probs) for key, name, probs in out]


def ensure_predictions(run_path, cfg, results, dataset=None):
  """Computes the per-example outputs (predictions.py) of every finished model of a run that
  lacks them (a run made before they were stored) from its SavedModel, and records them in
  the manifest; no retraining. Returns the manifest names computed.

  The data set is loaded only when something is missing (`dataset`: already loaded). When
  the data cannot be loaded, or a SavedModel is damaged, it logs why and leaves those
  rows without paired statistics.
  """
  task = tasks.get(cfg.task)
  missing = [
    (name, d, probs)
    for _, name, d, probs in model_dirs(run_path, results)
    if export.is_done(d) and not predictions.exists(d)
  ]
  done = []
  if not missing:
    return done
  try:
    dataset = dataset or task.load_data(cfg)
  except errors.UsageError as e:
    logging.warning("per-example outputs not computed (no paired statistics): %s", e)
    return done
  for name, d, probs in missing:
    try:
      task.store_predictions(cfg, dataset, d, probabilities=probs)
    except errors.UsageError as e:
      logging.warning("%s: per-example outputs not computed: %s", name, e)
      continue
    manifest.add_predictions(run_path, name, d)
    done.append(name)
  return done


def attach_comparisons(run_path, task, results, seed=0):
  """Adds `vs_teacher` and `vs_baseline` (stats.Comparison JSON, row minus reference, on the
  test split) to every row of `results` whose model and reference have stored outputs.

  Raises:
    errors.UsageError: a stored outputs file is damaged or not the one the manifest recorded.
  """
  entries = {}
  for r in results_lib.rows(results):
    entries[r.key] = r.entry
    for field, _ in results_lib.REFERENCES:
      r.entry.pop(field, None)
  outputs = {}
  for key, name, d, _ in model_dirs(run_path, results):
    if key in entries and not entries[key].get("damaged") and predictions.exists(d):
      predictions.check_path(d)  # a directory in its place: not hashed as if it were a file
      manifest.check_predictions(run_path, name, d)
      outputs[key] = predictions.read(d, task.prediction_arrays).get("test")
      if outputs[key] is None:  # every model stores its test outputs: the file is not whole
        raise errors.UsageError(
          f"{predictions.path(d)} holds no test outputs (damaged or replaced): delete it, and "
          "`python -m ban_tf.report --run_dir=<run>` recomputes it from the SavedModel"
        )
  for field, ref in results_lib.REFERENCES:
    ref_key = ref.capitalize()
    if outputs.get(ref_key) is None:
      continue
    for key, out in outputs.items():
      if key == ref_key or out is None:
        continue
      try:
        entries[key][field] = task.compare(out, outputs[ref_key], seed=seed).to_json()
      except ValueError as e:
        logging.warning("%s vs %s: no paired statistics: %s", key, ref, e)
  return results


def comparisons_note(results):
  """The lines under a table with paired comparisons: how they were computed, and LEGEND."""
  first = next(
    (
      r.entry[f]
      for r in results_lib.rows(results)
      for f, _ in results_lib.REFERENCES
      if r.entry.get(f)
    ),
    None,
  )
  if first is None:
    return ""
  return (
    f"\nΔ [95% CI] and p: {first['method']}, on the {first['n']} test {first.get('unit', '')} "
    f"both models scored (row minus reference; p from the paired test). {stats.LEGEND}\n"
  )


def seeds_note(agg):
  """The lines under an over-seed table: the method, which variance it includes, LEGEND."""
  first = next(
    (a[f] for a in agg for f, _ in results_lib.REFERENCES if a.get(f)),
    None,
  )
  if first is None:
    return ""
  teacher = next((a["vs_teacher"] for a in agg if a.get("vs_teacher")), None)
  includes = f" Variance included: {teacher['includes']}." if teacher else ""
  return f"\nΔ over seeds: {first['method']} (row_s minus reference_s per seed).{includes} {stats.LEGEND}\n"


def methods_note(rows):
  """The lines under a comparison table: how each row's Δ, CI and p were computed.

  A comparison mixes one-seed runs (paired bootstrap + McNemar over test examples) and --seeds
  runs (t-interval over per-seed deltas), so each method is named with the rows that use it
  (and, over seeds, which variance its interval includes).

  Args:
    rows: the comparison's row dicts ("name", "vs_teacher", "vs_baseline": Comparison JSON or None).
  """
  methods = {}
  for r in rows:
    for field, _ in results_lib.REFERENCES:
      c = r.get(field)
      if c:
        names = methods.setdefault((c["method"], c.get("includes", "")), [])
        if r["name"] not in names:
          names.append(r["name"])
  lines = [
    f"- {', '.join(names)}: {method}"
    + (f" (row_s minus reference_s per seed; variance included: {includes})" if includes else "")
    for (method, includes), names in methods.items()
  ]
  return "\nΔ [95% CI] and p:\n" + "\n".join(lines) + "\n" if lines else ""


def curve(history, task=None):
  """(epochs, values, source) of one generation's history for the curves panel (task.curve)."""
  epochs, values, source = (task or tasks.get("image")).curve(history)
  return np.asarray(epochs), np.asarray(values, dtype=np.float64), source


def plot(runs, path, legends=None):
  """Writes the two-panel figure; returns the legend labels of the curves panel.

  `legends`, a dict, receives what the figure shows (for tests): "summary" (the
  left panel's legend labels), "curves", and "spread_points" (per-run dots).
  """
  task = task_of(runs)
  metric = task.headline
  agg = {a["key"]: a for a in aggregate(runs, metric)}
  n_runs = len(runs)
  # One run: each row's paired comparison with the teacher (results.json's vs_teacher), if any.
  deltas = []
  if n_runs == 1:
    deltas = [
      (r.label, r.entry.get("vs_teacher"))
      for r in results_lib.rows(runs[0].results)
      if r.key != "Teacher"
    ]
  show_deltas = any(c for _, c in deltas)
  fig, axes = plt.subplots(1, 3 if show_deltas else 2, figsize=(18 if show_deltas else 12, 4.6))
  ax_err, ax_curve = axes[0], axes[1]
  spread = 0
  # Left: the headline metric per generation, ensembles BANE-k beside generation k.
  gens = [k for k in agg if not k.startswith("BANE") and results_lib.gen_of(k) is not None]
  ensembles = [k for k in agg if k.startswith("BANE")]
  for label, keys, style in (
    ("generations (Teacher, BAN-k)", gens, dict(color="C0", marker="o")),
    ("BANE-k ensembles (of BAN-1..k)", ensembles, dict(color="C1", marker="D", linestyle="")),
  ):
    if not keys:
      continue
    xs = [results_lib.gen_of(k) + (0.12 if k.startswith("BANE") else 0) for k in keys]
    mean = [agg[k]["mean"] for k in keys]
    std = [agg[k]["std"] for k in keys]
    ax_err.errorbar(
      xs,
      mean,
      yerr=std if n_runs > 1 else None,
      capsize=4,
      label=label + (f", mean ± std of {n_runs} runs" if n_runs > 1 else ""),
      **style,
    )
    for x, k in zip(xs, keys):
      ax_err.annotate(
        f"{agg[k]['mean']:.2f}",
        (x, agg[k]["mean"]),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=8,
      )
      if n_runs > 1:
        ax_err.scatter(
          [x] * len(agg[k]["values"]), agg[k]["values"], s=10, color="k", alpha=0.4, zorder=3
        )
        spread += len(agg[k]["values"])
  if "Teacher" in agg:
    ax_err.axhline(
      agg["Teacher"]["mean"], color="gray", linestyle="--", linewidth=1, label="teacher"
    )
  if "Baseline" in agg:  # BAN-1's architecture and seed on labels only: beside BAN-1
    b = agg["Baseline"]
    ax_err.errorbar(
      [0.88],
      [b["mean"]],
      yerr=[b["std"]] if n_runs > 1 else None,
      capsize=4,
      color="C2",
      marker="s",
      linestyle="",
      label="Baseline (BAN-1's arch, labels only)"
      + (f", mean ± std of {n_runs} runs" if n_runs > 1 else ""),
    )
    ax_err.axhline(b["mean"], color="C2", linestyle=":", linewidth=1)
    ax_err.annotate(
      f"{b['mean']:.2f}", (0.88, b["mean"]), textcoords="offset points", xytext=(-30, 4), fontsize=8
    )
    if n_runs > 1:
      ax_err.scatter([0.88] * len(b["values"]), b["values"], s=10, color="k", alpha=0.4, zorder=3)
      spread += len(b["values"])
  ax_err.set_xticks([results_lib.gen_of(k) for k in gens], gens)
  ax_err.set_ylabel(metric.title)
  ax_err.set_title(f"Final {metric.text or metric.title} per generation")
  ax_err.grid(alpha=0.3)
  ax_err.legend(fontsize=8)
  # Right: per-epoch curves of all generations overlaid (mean and std band over runs).
  labels = []
  for i, key in enumerate(gens):
    gen = results_lib.gen_of(key)
    curves = [curve(r.histories[gen], task) for r in runs if r.histories.get(gen)]
    curves = [c for c in curves if len(c[0])]
    if not curves:
      continue
    n = min(len(c[0]) for c in curves)
    epochs = curves[0][0][:n]
    values = np.stack([c[1][:n] for c in curves])
    source = curves[0][2]
    label = f"{key} ({'validation' if source == 'val' else 'train: no val split'})"
    ax_curve.plot(
      epochs, values.mean(0), color=f"C{i}", label=label, marker="." if n < 30 else None
    )
    if len(curves) > 1:
      ax_curve.fill_between(
        epochs,
        values.mean(0) - values.std(0, ddof=1),
        values.mean(0) + values.std(0, ddof=1),
        color=f"C{i}",
        alpha=0.2,
      )
    labels.append(label)
  # Whole epochs only: MaxNLocator(integer=True) falls back to fractions when the x range is
  # under 1 (a 1-epoch run's single point), so few epochs get a tick at every epoch.
  last = max((len(line.get_xdata()) for line in ax_curve.get_lines()), default=0)
  ax_curve.xaxis.set_major_locator(
    matplotlib.ticker.MultipleLocator(1)
    if last <= 10
    else matplotlib.ticker.MaxNLocator(integer=True)
  )
  ax_curve.set_xlabel("epoch")
  ax_curve.set_ylabel(task.curve_label)
  ax_curve.set_title(
    "Per-epoch curves of every generation" + (f" (mean ± std, {n_runs} runs)" if n_runs > 1 else "")
  )
  ax_curve.grid(alpha=0.3)
  if labels:
    ax_curve.legend(fontsize=8)
  cfg = runs[0].config
  data = runs[0].results.get("data")
  sizes = (
    f" ({data['train']}/{data['val']}/{data['test']} train/val/test {data['unit']})" if data else ""
  )
  seeds = (
    "seeds " + ",".join(str(r.config.get("seed", "?")) for r in runs)
    if n_runs > 1
    else f"seed {cfg.get('seed', '?')}"
  )
  teacher = os.path.basename(os.path.normpath(cfg["teacher"])) if cfg.get("teacher") else None
  fig.suptitle(
    f"{config_from_dict(cfg).data_name}{sizes}: {teacher or cfg.get('teacher_arch') or cfg.get('arch', '?')} -> "
    f"{cfg.get('arch', '?')}, {cfg.get('resolved', {}).get('loss', cfg.get('loss', '?'))} "
    f"(T={cfg.get('temperature', '?')}), {results_lib.plural(cfg.get('epochs', '?'), 'epoch')}, {seeds}"
  )
  drawn = {}
  if show_deltas:
    drawn = draw_deltas(
      axes[2],
      [n for n, _ in deltas],
      [c for _, c in deltas],
      "points" if metric.percent else metric.title,
    )
  fig.tight_layout()
  if legends is not None:
    fig.canvas.draw()
    legends.update(
      epoch_ticks=[
        float(t)
        for t in ax_curve.get_xticks()
        if ax_curve.get_xlim()[0] <= t <= ax_curve.get_xlim()[1]
      ],
      summary=[t.get_text() for t in ax_err.get_legend().get_texts()],
      curves=list(labels),
      spread_points=spread,
      deltas=drawn,
    )
  _save(fig, path)
  return labels


VERDICT_STYLE = {  # stats.verdict -> marker colour in report.png
  "better": "tab:green",
  "worse": "tab:red",
  "no difference detected": "tab:gray",
}


def draw_deltas(ax, names, comparisons, unit, references=()):
  """Δ vs teacher per row with its 95% CI as error bars, coloured by verdict (one legend entry
  per verdict); rows without a paired comparison are left out (said in the title).

  Args:
    ax: a matplotlib Axes.
    names: row names (x tick labels).
    comparisons: stats.Comparison.to_json() per row, or None.
    unit: the Δ's unit for the y label.
    references: names of rows that are references (teachers): no comparison expected.

  Returns:
    {row name: (delta, lo, hi, verdict)} as drawn (read back from the error bars; lo/hi
    None for an undefined interval, drawn as a bare point).
  """
  drawn = {}
  for verdict, colour in VERDICT_STYLE.items():
    xs = [i for i, c in enumerate(comparisons) if c and c["verdict"] == verdict]
    if not xs:
      continue
    ys = [comparisons[i]["delta"] for i in xs]
    lo = [
      0.0
      if comparisons[i]["ci95"][0] is None
      else comparisons[i]["delta"] - comparisons[i]["ci95"][0]
      for i in xs
    ]
    hi = [
      0.0
      if comparisons[i]["ci95"][1] is None
      else comparisons[i]["ci95"][1] - comparisons[i]["delta"]
      for i in xs
    ]
    bars = ax.errorbar(
      xs, ys, yerr=[lo, hi], fmt="o", color=colour, capsize=5, label=verdict, markersize=7
    )
    seg = bars.lines[2][0].get_segments() if bars.lines[2] else []
    for j, (x, y) in enumerate(zip(*bars.lines[0].get_data())):
      c = comparisons[xs[j]]
      bounds = (None, None) if c["ci95"][0] is None else (seg[j][0][1], seg[j][1][1])
      drawn[names[int(round(x))]] = (float(y), *bounds, verdict)
      ax.annotate(
        verdict, (x, y), textcoords="offset points", xytext=(8, -3), fontsize=7, color=colour
      )
  ax.axhline(0.0, color="k", linewidth=0.8)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  ax.set_xlim(-0.5, len(names) - 0.5)
  ax.set_ylabel(f"Δ vs teacher ({unit}; positive = worse)")
  missing = sum(1 for n, c in zip(names, comparisons) if not c and n not in references)
  ax.set_title(
    "Δ vs teacher, 95% CI"
    + (f" ({missing} row{'s' if missing > 1 else ''} without stored outputs)" if missing else "")
  )
  ax.grid(alpha=0.3)
  if drawn:
    ax.legend(fontsize=8, title="verdict", title_fontsize=8)
  return drawn


def _save(fig, path):
  """Writes the figure to `path` atomically (export.write_bytes: no temporary file is left
  behind when the write fails)."""
  png = io.BytesIO()
  fig.savefig(png, dpi=110, format="png")
  plt.close(fig)
  export.write_bytes(png.getvalue(), path)


def plot_comparison(rows, path, task, title="", legends=None):
  """report.png of a comparison: the headline per row (± std over seeds) and Δ vs teacher with 95% CIs.

  `legends`, a dict, receives what the figure shows (for tests): "values" {row name:
  (mean, std)} and "deltas" (`draw_deltas`'s return), both read back from the artists.
  """
  metric = task.headline
  names = [r["name"] for r in rows]
  fig, (ax_v, ax_d) = plt.subplots(1, 2, figsize=(max(12, 1.1 * len(rows) + 6), 5.2))
  bars = ax_v.errorbar(
    range(len(rows)),
    [r["mean"] for r in rows],
    yerr=[r["std"] for r in rows],
    fmt="o",
    color="C0",
    capsize=4,
  )
  teachers = [i for i, r in enumerate(rows) if r["key"] == "Teacher"]
  for i in teachers:
    ax_v.axhline(rows[i]["mean"], color="gray", linestyle="--", linewidth=1)
  for i, r in enumerate(rows):
    ax_v.annotate(
      f"{r['mean']:.2f}", (i, r["mean"]), textcoords="offset points", xytext=(6, 4), fontsize=8
    )
  ax_v.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
  ax_v.set_ylabel(metric.title)
  ax_v.set_title(f"Final {metric.text or metric.title} (± std over seeds; dashed: teacher)")
  ax_v.grid(alpha=0.3)
  unit = "points" if metric.percent else metric.title
  teachers_ = [r["name"] for r in rows if r["key"] == "Teacher"]
  drawn = draw_deltas(ax_d, names, [r.get("vs_teacher") for r in rows], unit, teachers_)
  fig.suptitle(title)
  fig.tight_layout()
  if legends is not None:
    xs, ys = bars.lines[0].get_data()
    segs = bars.lines[2][0].get_segments()
    legends.update(
      values={names[int(x)]: (float(y), float(s[1][1] - y)) for x, y, s in zip(xs, ys, segs)},
      deltas=drawn,
    )
  _save(fig, path)


def experiment_hparams(config: dict) -> dict:
  """The experiment's flags from a config.json, as TensorBoard hparams values.

  Every field that changes what is trained (config.NON_EXPERIMENT_FIELDS and the
  base seed left out: the seed is its own hparam, the rest may change on resume),
  lists joined by commas, None as "".
  """
  defaults = config_lib.Config().to_dict()
  out = {}
  for name in sorted(defaults):
    if name in config_lib.NON_EXPERIMENT_FIELDS or name in ("seed", "resolved"):
      continue
    v = config.get(name, defaults[name])
    if isinstance(v, (list, tuple)):
      v = ",".join(str(x) for x in v)
    out[name] = "" if v is None else v
  return out


def experiment_id(config: dict) -> str:
  """A short name unique per experiment (dataset, arch, loss and a hash of every experiment flag)."""
  flags = experiment_hparams(config)
  digest = hashlib.sha1(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:8]
  arch = (
    config.get("arch", "?")
    if not config.get("teacher_arch")
    else f"{config['teacher_arch']}-to-{config['arch']}"
  )
  loss = config.get("resolved", {}).get("loss", config.get("loss", "?"))
  return f"{config_from_dict(config).data_name}-{arch}-{loss}-{digest}"


def _session_hparams(run, entry, ensemble):
  """The hparams of one generation's (or ensemble's) session: the experiment's flags, then the row's own."""
  cfg = run.config
  obj = entry.get("objective") or {
    "loss": cfg.get("resolved", {}).get("loss", cfg.get("loss", "")),
    "temperature": cfg.get("temperature", 1.0),
  }
  gen = entry["gen"] if not ensemble else max(entry["members"])
  gen = 1 if gen == "baseline" else gen  # the baseline has BAN-1's architecture and seed
  out = {f"flag/{k}": v for k, v in experiment_hparams(cfg).items()}
  out.update(
    {
      "gen": int(gen),
      "role": entry.get("role") or entry["name"],
      "arch": "ensemble" if ensemble else entry["arch"],
      "loss": obj["loss"],
      "temperature": float(obj["temperature"]),
      "seed": int(cfg.get("seed", 0)),
      "dataset": config_from_dict(cfg).data_name,
      "experiment": experiment_id(cfg),
    }
  )
  return out


def _metrics(task):
  """The scalars HParams shows per session: final test and validation metrics."""
  names = list(METRICS) + ["val/accuracy"]
  if task.perplexity:
    names += ["test/final_perplexity", "val/final_perplexity"]
  return names


# Columns the HParams table shows by default: its dashboard shows the first 5 hparams, those
# marked `differs` first, then by name (TensorBoard 2.21: backend_context.py sorts an experiment's
# hparam_infos by (not differs, name); the tf-hparams frontend checks the first 5).
SHOWN_HPARAMS = ("experiment", "gen", "loss", "role", "seed")
SERIES_DIRS = ("generations", "ensembles", "baseline")  # tb/<series>: step = generation index


def experiment_config(names, metrics):
  """The serialized hparams experiment summary (hp.hparams_config_pb) with SHOWN_HPARAMS marked
  `differs` (they do differ between the sessions of a run), so the HParams table shows them
  without checking their boxes."""
  pb = hp.hparams_config_pb(
    hparams=[hp.HParam(n) for n in names],
    metrics=[hp.Metric(m, display_name=m) for m in metrics],
  )
  content = pb.value[0].metadata.plugin_data
  data = plugin_data_pb2.HParamsPluginData.FromString(content.content)
  for info in data.experiment.hparam_infos:
    info.differs = info.name in SHOWN_HPARAMS
  content.content = data.SerializeToString()
  return pb.SerializeToString()


def _family(key):
  """The series a row belongs to over the generation index, and its step there."""
  if key == "Baseline":
    return "baseline", 1  # BAN-1's architecture and seed
  return ("ensembles" if key.startswith("BANE") else "generations"), results_lib.gen_of(key)


def write_series(logdir, metric, points, text=None):
  """Rows as TensorBoard series over the generation index (step = generation).

  Args:
    logdir: the parent of the series' TensorBoard runs (<logdir>/generations,
      /ensembles, /baseline and their _ci95_low/_ci95_high); they are replaced.
    metric: the headline results.Metric (tag `by_generation/<metric.key>`, table units).
    points: [(row key, value or None, vs_teacher JSON or None)]: Teacher at step 0, BAN-k
      and BANE-k at k, the Baseline at 1; a row's `vs_teacher` adds
      `by_generation/delta_vs_teacher` and its 95% CI bounds as the series
      <series>_ci95_low and _ci95_high (the bounds then are the chart's extremes, so
      "ignore outliers" trims them, not the estimates).
    text: markdown written to <logdir>/generations as the text summary `results` (step 0).
  """
  for name in SERIES_DIRS:
    for suffix in ("", "_ci95_low", "_ci95_high"):
      shutil.rmtree(os.path.join(logdir, name + suffix), ignore_errors=True)
  writers = {}

  def scalar(run, step, tag, value):
    if run not in writers:
      writers[run] = _file_writer(tf, os.path.join(logdir, run), filename_suffix=SERIES_SUFFIX)
    with writers[run].as_default(step=step):
      tf.summary.scalar(tag, value)

  for key, value, vs in points:
    family, step = _family(key)
    if value is not None:
      scalar(family, step, f"by_generation/{metric.key}", value)
    if vs and vs.get("delta") is not None:
      scalar(family, step, "by_generation/delta_vs_teacher", vs["delta"])
      for suffix, bound in zip(("_ci95_low", "_ci95_high"), vs["ci95"]):
        if bound is not None:
          scalar(family + suffix, step, "by_generation/delta_vs_teacher", bound)
  if text is not None:
    w = writers.get("generations") or _file_writer(
      tf, os.path.join(logdir, "generations"), filename_suffix=SERIES_SUFFIX
    )
    writers["generations"] = w
    with w.as_default(step=0):
      tf.summary.text("results", text)
  for w in writers.values():
    w.close()


def write_generation_series(run):
  """One run's rows as series over the generation index in its tb/ (`write_series`:
  tb/generations, tb/ensembles, tb/baseline), with its results table as text."""
  task = task_of([run])
  points = [
    (r.key, task.headline.value(r.entry), r.entry.get("vs_teacher"))
    for r in results_lib.rows(run.results)
    if not r.entry.get("damaged")
  ]
  write_series(
    os.path.join(run.path, layout.TENSORBOARD),
    task.headline,
    points,
    text=results_lib.table(run.results, task.headline, task.extra_columns),
  )


def write_comparison_summary(out_dir, rows, groups, task, text):
  """A comparison in TensorBoard (out_dir/tb): its results.md as text (tb/comparison, tag
  `comparison`, step 0), and per compared run the rows as series over the generation index
  (tb/<run label>/generations, ...: `write_series`, the shared Teacher at step 0 of each;
  over several seeds the mean), so the runs' lines overlay in one chart."""
  root = os.path.join(out_dir, layout.TENSORBOARD)
  logdir = os.path.join(root, "comparison")
  shutil.rmtree(logdir, ignore_errors=True)
  writer = _file_writer(tf, logdir)
  with writer.as_default(step=0):
    tf.summary.text("comparison", text)
  writer.close()
  for g in groups:
    own = [r for r in rows if r["run"] == g.label and r["key"] != "Teacher"]
    teacher = next((r for r in rows if r["name"] == (own[0]["teacher"] if own else None)), None)
    points = [
      (r["key"], r["mean"], r.get("vs_teacher")) for r in ([teacher] if teacher else []) + own
    ]
    write_series(os.path.join(root, g.label), task.headline, points)


def _file_writer(tf, logdir, **kwargs):
  """tf.summary.create_file_writer, whose failure (TF's PermissionDeniedError on a read-only
  directory) is the OSError every other write of the report raises."""
  try:
    return tf.summary.create_file_writer(logdir, **kwargs)
  except tf.errors.OpError as e:
    raise OSError(None, e.message.rsplit(";", 1)[-1].strip(), logdir) from None


def write_hparams(run):
  """One hparams session per generation, baseline and ensemble, in its TensorBoard run (tb/<row name>).

  Trial ids are `experiment_id/seed_S/<row name>`: unique per experiment, base seed and
  generation, so several experiments and seeds under one TensorBoard logdir stay
  separate rows. Each session's logdir also holds the experiment summary (the
  hparam and metric names, identical in every run), so the run directory itself
  holds no events file (no empty "." run in TensorBoard). The metrics are the
  test and validation scalars the generation's run already holds (written here
  for ensembles). Files this function wrote before are replaced.
  """
  task = task_of([run])
  metrics = _metrics(task)
  names = (
    list(HPARAM_NAMES) + ["experiment"] + [f"flag/{k}" for k in experiment_hparams(run.config)]
  )

  def fresh_writer(logdir):
    for old in glob.glob(os.path.join(logdir, "*" + HPARAMS_SUFFIX)):
      os.remove(old)
    return _file_writer(tf, logdir, filename_suffix=HPARAMS_SUFFIX)

  def session(writer, hparams, trial):
    with writer.as_default():
      tf.summary.experimental.write_raw_pb(experiment_config(names, metrics), step=0)
      hp.hparams(hparams, trial_id=trial)

  for old in glob.glob(os.path.join(run.path, "*tfevents*" + HPARAMS_SUFFIX)):
    os.remove(old)  # the experiment summary's old place (a "." run)
  epochs = int(run.config.get("epochs", 0))
  trial = f"{experiment_id(run.config)}/seed_{int(run.config.get('seed', 0))}"
  generations = list(run.results["generations"])
  if run.results.get("baseline"):
    generations.append(run.results["baseline"])
  for g in generations:
    if g.get("damaged") or "arch" not in g:
      continue  # a damaged row: no session (its numbers may be missing)
    name = results_lib.generation_name(g["gen"])
    writer = fresh_writer(rundir.tensorboard_dir(run.path, name))
    session(writer, _session_hparams(run, g, False), f"{trial}/{name}")
    writer.close()
  for e in run.results["ensembles"]:
    if e.get("damaged") or "test_accuracy" not in e:
      continue
    k = max(e["members"])
    name = e.get("name") or f"BANE-{k}"
    logdir = rundir.tensorboard_dir(run.path, name)
    shutil.rmtree(logdir, ignore_errors=True)  # written only here
    writer = _file_writer(tf, logdir)
    session(writer, _session_hparams(run, e, True), f"{trial}/{name}")
    with writer.as_default(step=epochs):
      for key, tag in (
        ("test_accuracy", "test/accuracy"),
        ("test_error", "test/error"),
        ("val_accuracy", "val/accuracy"),
        ("test_perplexity", "test/final_perplexity"),
        ("val_perplexity", "val/final_perplexity"),
      ):
        if e.get(key) is not None:
          tf.summary.scalar(tag, e[key])
    writer.close()
  write_generation_series(run)


_GENERIC_KEYS = (
  "gen",
  "role",
  "arch",
  "params",
  "epochs",
  "seconds",
  "seed",
  "objective",
  "teacher",
  "damaged",
)


def write_results(run_dir, results, cfg, spec=None):
  """results.json (the rows' metrics, the task's fields, the data's sizes) and results.md of one run.

  `spec`: the run's tasks.DataSpec, for the split sizes; None keeps those that
  `results` already holds (a report redone from results.json).
  """
  clean, text = results_with_comparisons(run_dir, results, cfg, spec)
  rundir.RunFiles(run_dir).write_results(clean, text)
  return clean


def results_with_comparisons(run_dir, results, cfg, spec=None):
  """(results.json's dict, results.md's text) of one run, each row with its paired comparisons
  (from the run's stored per-example outputs); writes nothing."""
  task = tasks.get(cfg.task)
  keep = _GENERIC_KEYS + ("name", "members") + tuple(task.result_keys)
  keep += tuple(f for f, _ in results_lib.REFERENCES)
  clean = {
    "generations": [{k: g[k] for k in keep if k in g} for g in results["generations"]],
    "ensembles": [{k: e[k] for k in keep if k in e} for e in results["ensembles"]],
    "baseline": (
      {k: v for k, v in results["baseline"].items() if k != "final_train"}
      if results.get("baseline")
      else None
    ),
    "dataset": cfg.data_name,
    "seed": cfg.seed,
    "epochs": cfg.epochs,
    "data": results_lib.data_sizes(spec) if spec is not None else results.get("data"),
  }
  attach_comparisons(run_dir, task, clean)
  text = (
    results_lib.title(cfg, task.headline, data=clean["data"])
    + results_lib.table(clean, task.headline, task.extra_columns)
    + comparisons_note(clean)
  )
  return clean, text


COMPARED_KEY = "compared"  # a comparison's results.json: {"compared", "metric", "data", "rows"}


def _check_comparison_out_dir(out_dir):
  """A comparison's results.json may only replace an earlier comparison's (never a run's or a
  --seeds summary's)."""
  path = os.path.join(out_dir, layout.RESULTS_JSON)
  if not os.path.exists(path):
    return
  held = export.read_json_checked(path, "delete it or pass another --out_dir")
  if COMPARED_KEY not in held:
    what = "a run's results" if "generations" in held else "a --seeds summary"
    raise errors.UsageError(
      f"--out_dir={out_dir} holds {what} (results.json), which a comparison would replace: "
      "pass another --out_dir"
    )


def comparison_title(groups, task):
  """The heading of a comparison's results.md: data, test set, the runs and what each changes."""
  first = groups[0].runs[0]
  cfg = config_from_dict(first.config)
  data = first.results.get("data")
  sizes = f", {data['test']} test {data['unit']}" if data else ""
  lines = [
    f"# {cfg.data_name}: {len(groups)} experiments on one test set{sizes}",
    "",
    "Rows are named `<row> (<run>)`: <run> is the run directory's name without what every "
    "compared directory's name shares; a teacher that is the same model in several runs "
    "(the same gen_0) is one row. Δ = row minus its teacher (or its run's Baseline), in the "
    "column's unit: positive = worse. Final-epoch values; over several seeds, mean ± std "
    "(ddof=1).",
    "",
    "Runs:",
  ]
  for g in groups:
    diff = experiment_diff(groups[0].runs[0], g.runs[0])
    seeds = ", ".join(str(r.config.get("seed", "?")) for r in g.runs)
    what = f"; {_shown(groups[0].runs[0], g.runs[0], diff)}" if diff and g is not groups[0] else ""
    lines.append(f"- {g.label}: {g.path} (seed{'s' if len(g.runs) > 1 else ''} {seeds}{what})")
  return "\n".join(lines) + "\n\n"


def _write_comparison(groups, task, out_dir, hparams):
  """results.md, results.json and report.png of a comparison (write_report with several experiments)."""
  _check_comparison_out_dir(out_dir)
  group_labels(groups)
  rows = compare(groups, task)
  os.makedirs(out_dir, exist_ok=True)
  text = (
    comparison_title(groups, task)
    + results_lib.comparison_table(rows, task.headline)
    + methods_note(rows)
    + "\n"
    + stats.LEGEND
    + "\n"
  )
  export.write_json(
    {
      COMPARED_KEY: [g.path for g in groups],  # absolute (group_experiments)
      "metric": task.headline.key,
      "data": groups[0].runs[0].results.get("data"),
      "rows": rows,
    },
    os.path.join(out_dir, layout.RESULTS_JSON),
  )
  export.write_text(text, os.path.join(out_dir, layout.RESULTS_MD))
  png = os.path.join(out_dir, PNG)
  plot_comparison(rows, png, task, title=text.splitlines()[0].lstrip("# "))
  if hparams:
    write_comparison_summary(out_dir, rows, groups, task, text)
    for g in groups:
      for r in g.runs:
        write_hparams(r)
  return {"results_md": os.path.join(out_dir, layout.RESULTS_MD), "png": png}


def write_report(run_dirs, out_dir=None, hparams=True):
  """Writes results.md and report.png (and hparams for single runs); returns their paths.

  Args:
    run_dirs: a run directory, a parent of run directories (e.g. of --seeds), or a
      list of them.
    out_dir: where several runs' summary goes (default: the parent directory
      given, or the runs' common parent).
    hparams: write TensorBoard hparams summaries into each run directory.
  """
  if isinstance(run_dirs, str):
    paths = find_runs(run_dirs)
    default_out = run_dirs
  else:
    paths = [p for d in run_dirs for p in find_runs(d)]
    default_out = os.path.commonpath([os.path.abspath(p) for p in paths])
  runs = [load_run(p) for p in paths]
  try:
    return _write_report(runs, out_dir, default_out, hparams)
  except OSError as e:  # read-only directory, a directory where a file goes, a full disk
    where = e.filename2 or e.filename or out_dir or default_out
    if os.path.basename(where).startswith(".tmp-"):  # export's temporary file: its directory failed
      where = os.path.dirname(where)
    raise errors.UsageError(
      f"cannot write {where} ({type(e).__name__}: {e.strerror or e}): make it writable (fix "
      "the permissions, or remove what is in the way), or write elsewhere with --out_dir=DIR "
      "--nohparams"
    ) from None


def _write_report(runs, out_dir, default_out, hparams):
  """write_report once the runs are read: every file it writes."""
  task = task_of(runs)
  if len(runs) == 1 and out_dir is None:
    out_dir = runs[0].path
    cfg = config_from_dict(runs[0].config)
    ensure_predictions(out_dir, cfg, runs[0].results)
    runs[0].results = write_results(out_dir, runs[0].results, cfg)
  else:
    check_one_test_set(runs)
    groups = group_experiments(runs)  # refuses a seed twice before any work
    for r in runs:  # each run's paired deltas, from its stored (or now computed) outputs
      r_cfg = config_from_dict(r.config)
      ensure_predictions(r.path, r_cfg, r.results)
      # In memory: a summary writes to out_dir (and hparams when asked), not into its runs.
      r.results, _ = results_with_comparisons(r.path, r.results, r_cfg)
    out_dir = out_dir or default_out
    if len(groups) > 1:
      return _write_comparison(groups, task, out_dir, hparams)
    os.makedirs(out_dir, exist_ok=True)
    cfg = config_from_dict(runs[0].config)
    seeds = [r.config.get("seed", "?") for r in runs]
    names = ", ".join(os.path.basename(os.path.normpath(r.path)) for r in runs)
    agg = aggregate(runs)
    text = (
      results_lib.title(cfg, task.headline, seeds=seeds, data=runs[0].results.get("data"))
      + f"Runs: {names}.\n\n"
      + results_lib.aggregate_table(agg, task.headline)
      + seeds_note(agg)
    )
    export.write_text(text, rundir.RunFiles(out_dir).results_md_path)
  png = os.path.join(out_dir, PNG)
  plot(runs, png)
  if hparams:
    for r in runs:
      write_hparams(r)
  return {"results_md": rundir.RunFiles(out_dir).results_md_path, "png": png}


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top

  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string(
    "run_dir", None, "A run directory, or a parent directory of several (seed) runs."
  )
  flags.DEFINE_list("run_dirs", [], "Several run directories to summarise together (mean and std).")
  flags.DEFINE_string(
    "out_dir", None, "Where a multi-run summary goes (default: their common parent)."
  )
  flags.DEFINE_bool(
    "hparams", True, "Also write TensorBoard hparams summaries into the run directories."
  )
  FLAGS = flags.FLAGS

  def main(argv):
    # tfds logs every file it opens at INFO (when outputs of an old run are computed), as evaluate.
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1 or bool(FLAGS.run_dir) == bool(FLAGS.run_dirs):
      print("error: pass exactly one of --run_dir=DIR or --run_dirs=A,B,...", file=sys.stderr)
      sys.exit(2)
    try:
      out = write_report(FLAGS.run_dir or FLAGS.run_dirs, FLAGS.out_dir, FLAGS.hparams)
    except errors.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(open(out["results_md"]).read())
    print(f"wrote {out['results_md']} and {out['png']}")

  from ban_tf import console  # pylint: disable=g-import-not-at-top

  console.run_app(main)
