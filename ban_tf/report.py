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
import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")  # no display: write files only

from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from ban_tf import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import export  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import results as results_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

PNG = "report.png"
HPARAMS_SUFFIX = ".hparams"  # event files written here; replaced, not appended, on a rerun
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
  res_path = os.path.join(path, "results.json")
  if not os.path.exists(res_path):
    raise errors.UsageError(
      f"{path} has no results.json: pass a run directory whose first generation finished"
    )
  cfg_path = os.path.join(path, "config.json")
  cfg = export.read_json_checked(cfg_path, "restore it") if os.path.exists(cfg_path) else {}
  results = export.read_json_checked(
    res_path, "rerun the training command to rebuild it from the generations"
  )
  if "generations" not in results:
    raise errors.UsageError(
      f"{path} holds the summary of several runs, not one run: pass it as --run_dir"
    )
  histories = {}
  for g in results["generations"]:
    hist = os.path.join(path, f"gen_{g['gen']}", "history.json")
    if os.path.exists(hist):
      try:
        histories[g["gen"]] = export.read_json_checked(hist, "its curve is left out", expect=list)
      except errors.UsageError as e:
        logging.warning("%s", e)
  return Run(path, cfg, results, histories)


def _is_single_run(path):
  """A run directory (its results.json has generations), not a --seeds parent's summary."""
  res_path = os.path.join(path, "results.json")
  return os.path.exists(res_path) and "generations" in export.read_json_checked(
    res_path, "rerun the training command to rebuild it from the generations"
  )


def find_runs(path):
  """`path` itself when it is a run directory, else its sub-directories that are
  (the seed_S/ runs of a --seeds parent, or any parent of run directories)."""
  if _is_single_run(path):
    return [path]
  subs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "results.json")))
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


def check_one_experiment(runs):
  """Raises errors.UsageError unless the runs are seeds of one experiment.

  A mean ± std is only a seed spread when every run trained the same recipe
  (config.json equal but for the seed, --student_seed moved with it as --seeds does,
  --baseline and what may change on resume, config.NON_EXPERIMENT_FIELDS) and each seed counts once (a copied run directory
  passed beside its original would be counted twice).
  """
  first = config_from_dict(runs[0].config)
  known = set(first.to_dict())  # a key only an older config.json has is not compared
  seen = {}
  for r in runs:
    diff = [
      k
      for k in first.experiment_diff(r.config)
      if k in known and k not in ("seed", "baseline", "resolved", "student_seed")
    ]
    if _student_offset(runs[0].config) != _student_offset(
      r.config
    ):  # --seeds moves it with the seed
      diff.append("student_seed")
    if diff:

      def value(config, k):
        if k != "student_seed":
          return config.get(k)
        off = _student_offset(config)
        return "seed+1" if off is None else f"seed{off:+d}"

      shown = ", ".join(
        f"--{k} {value(runs[0].config, k)} vs {value(r.config, k)}" for k in diff[:3]
      )
      raise errors.UsageError(
        f"{runs[0].path} and {r.path} are different experiments ({shown}): "
        "summarise the seeds of one experiment at a time"
      )
    seed = r.config.get("seed")
    if seed is not None and seed in seen:
      raise errors.UsageError(
        f"{seen[seed]} and {r.path} are both seed {seed} (the same run twice?): "
        "pass each seed's run once"
      )
    seen[seed] = r.path


def aggregate(runs, metric=None):
  """results.aggregate of the runs' `metric` (default: their task's headline)."""
  metric = metric or task_of(runs).headline
  return results_lib.aggregate([r.results for r in runs], metric)


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
  fig, (ax_err, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.6))
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
  ax_curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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
    f"(T={cfg.get('temperature', '?')}), {cfg.get('epochs', '?')} epochs, {seeds}"
  )
  fig.tight_layout()
  if legends is not None:
    legends.update(
      summary=[t.get_text() for t in ax_err.get_legend().get_texts()],
      curves=list(labels),
      spread_points=spread,
    )
  tmp = os.path.join(
    os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}"
  )
  fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  os.replace(tmp, path)
  return labels


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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top

  task = task_of([run])
  metrics = _metrics(task)
  names = (
    list(HPARAM_NAMES) + ["experiment"] + [f"flag/{k}" for k in experiment_hparams(run.config)]
  )

  def fresh_writer(logdir):
    for old in glob.glob(os.path.join(logdir, "*" + HPARAMS_SUFFIX)):
      os.remove(old)
    return tf.summary.create_file_writer(logdir, filename_suffix=HPARAMS_SUFFIX)

  def session(writer, hparams, trial):
    with writer.as_default():
      hp.hparams_config(
        hparams=[hp.HParam(n) for n in names],
        metrics=[hp.Metric(m, display_name=m) for m in metrics],
      )
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
    writer = fresh_writer(results_lib.tensorboard_dir(run.path, name))
    session(writer, _session_hparams(run, g, False), f"{trial}/{name}")
    writer.close()
  for e in run.results["ensembles"]:
    if e.get("damaged") or "test_accuracy" not in e:
      continue
    k = max(e["members"])
    name = e.get("name") or f"BANE-{k}"
    logdir = results_lib.tensorboard_dir(run.path, name)
    shutil.rmtree(logdir, ignore_errors=True)  # written only here
    writer = tf.summary.create_file_writer(logdir)
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
  task = tasks.get(cfg.task)
  keep = _GENERIC_KEYS + ("name", "members") + tuple(task.result_keys)
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
  export.write_json(clean, os.path.join(run_dir, "results.json"))
  text = results_lib.title(cfg, task.headline, data=clean["data"]) + results_lib.table(
    clean, task.headline, task.extra_columns
  )
  export.write_text(text, os.path.join(run_dir, "results.md"))
  return clean


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
  task = task_of(runs)
  if len(runs) == 1 and out_dir is None:
    out_dir = runs[0].path
    write_results(out_dir, runs[0].results, config_from_dict(runs[0].config))
  else:
    check_one_experiment(runs)
    out_dir = out_dir or default_out
    os.makedirs(out_dir, exist_ok=True)
    cfg = config_from_dict(runs[0].config)
    seeds = [r.config.get("seed", "?") for r in runs]
    names = ", ".join(os.path.basename(os.path.normpath(r.path)) for r in runs)
    text = (
      results_lib.title(cfg, task.headline, seeds=seeds, data=runs[0].results.get("data"))
      + f"Runs: {names}.\n\n"
      + results_lib.aggregate_table(aggregate(runs), task.headline)
    )
    export.write_text(text, os.path.join(out_dir, "results.md"))
  png = os.path.join(out_dir, PNG)
  plot(runs, png)
  if hparams:
    for r in runs:
      write_hparams(r)
  return {"results_md": os.path.join(out_dir, "results.md"), "png": png}


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top

  from absl import app  # pylint: disable=g-import-not-at-top
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

  app.run(main)
