"""Run reports: results.md, report.png and TensorBoard hparams from finished run dirs.

  python -m ban_tf.report --run_dir=runs/cifar10-wrn-28-1-ban-seed0
  python -m ban_tf.report --run_dir=runs/seeds        # a parent of seed runs: mean and std
  python -m ban_tf.report --run_dirs=runs/s0,runs/s1 --out_dir=runs/summary

Everything is read from what a run leaves on disk (config.json, results.json,
gen_k/history.json), so a report can be redone at any time; generations.run calls
`write_report` when a run finishes. Several runs (seeds) are summarised by the
mean and the sample standard deviation (ddof=1) of each model's test error.
"""

import dataclasses
import glob
import os
import shutil

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.ticker  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from ban_tf import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from ban_tf import export  # pylint: disable=g-import-not-at-top,wrong-import-position

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
    raise errors.UsageError(f"{path} has no results.json: pass a run directory whose first generation finished")
  cfg_path = os.path.join(path, "config.json")
  cfg = export.read_json(cfg_path) if os.path.exists(cfg_path) else {}
  results = export.read_json(res_path)
  histories = {}
  for g in results["generations"]:
    hist = os.path.join(path, f"gen_{g['gen']}", "history.json")
    if os.path.exists(hist):
      histories[g["gen"]] = export.read_json(hist)
  return Run(path, cfg, results, histories)


def find_runs(path):
  """`path` itself when it is a run directory, else its sub-directories that are."""
  if os.path.exists(os.path.join(path, "results.json")):
    return [path]
  subs = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "*", "results.json")))
  if not subs:
    raise errors.UsageError(f"{path} holds no results.json, nor do its sub-directories: pass a run directory")
  return subs


def config_from_dict(d):
  """The Config stored in config.json (unknown keys, e.g. `resolved`, dropped)."""
  names = {f.name for f in dataclasses.fields(config_lib.Config)}
  kwargs = {k: v for k, v in d.items() if k in names}
  if "lr_milestones" in kwargs:
    kwargs["lr_milestones"] = tuple(kwargs["lr_milestones"])
  return config_lib.Config(**kwargs)


def model_names(results):
  """Row names in table order: Teacher, BAN-1..N, BANE-2..N."""
  names = ["Teacher" if g["gen"] == 0 else f"BAN-{g['gen']}" for g in results["generations"]]
  return names + [e["name"] for e in results["ensembles"]]


def test_errors(results):
  """{model name: test error} for one run."""
  errs = [g["test_error"] for g in results["generations"]] + [e["test_error"] for e in results["ensembles"]]
  return dict(zip(model_names(results), errs))


def aggregate(runs):
  """{model name: (mean, std, values)} of the test error over runs (std ddof=1; 0 for one run)."""
  per_run = [test_errors(r.results) for r in runs]
  names = [n for n in model_names(runs[0].results) if all(n in p for p in per_run)]
  out = {}
  for n in names:
    v = np.array([p[n] for p in per_run], dtype=np.float64)
    out[n] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, v.tolist())
  return out


def _gen_of(name):
  """Teacher -> 0, BAN-k -> k, BANE-k -> k."""
  return 0 if name == "Teacher" else int(name.split("-")[1])


def summary_table(runs):
  """Markdown: mean ± std test error per model over several runs (seeds)."""
  agg = aggregate(runs)
  base = agg.get("Teacher", (None,))[0]
  lines = [f"| Model | Runs | Test error (%) mean ± std | Δ vs teacher | Per run (%) |",
           "|---|---|---|---|---|"]
  for name, (mean, std, values) in agg.items():
    delta = "" if base is None or name == "Teacher" else f"{100 * (mean - base):+.2f}"
    each = ", ".join(f"{100 * v:.2f}" for v in values)
    lines.append(f"| {name} | {len(values)} | {100 * mean:.2f} ± {100 * std:.2f} | {delta} | {each} |")
  return "\n".join(lines) + "\n"


def curve(history):
  """(epochs, error %, source) of one generation: validation error, or train error without a val split."""
  key = "val_accuracy" if history and all("val_accuracy" in h for h in history) else "accuracy"
  epochs = np.array([h["epoch"] for h in history])
  err = np.array([100.0 * (1.0 - h[key]) for h in history])
  return epochs, err, "val" if key == "val_accuracy" else "train"


def plot(runs, path):
  """Writes the two-panel figure; returns the legend labels of the curves panel."""
  agg = aggregate(runs)
  n_runs = len(runs)
  fig, (ax_err, ax_curve) = plt.subplots(1, 2, figsize=(12, 4.6))
  # Left: final test error per generation, ensembles BANE-k beside generation k.
  gens = [n for n in agg if not n.startswith("BANE")]
  ensembles = [n for n in agg if n.startswith("BANE")]
  for label, names, style in (("generations (teacher, BAN-k)", gens, dict(color="C0", marker="o")),
                              ("BANE-k ensembles (BAN-1..k)", ensembles,
                               dict(color="C1", marker="D", linestyle=""))):
    if not names:
      continue
    xs = [_gen_of(n) + (0.12 if n.startswith("BANE") else 0) for n in names]
    mean = [100 * agg[n][0] for n in names]
    std = [100 * agg[n][1] for n in names]
    ax_err.errorbar(xs, mean, yerr=std if n_runs > 1 else None, capsize=4,
                    label=label + (f", mean ± std of {n_runs} runs" if n_runs > 1 else ""), **style)
    for x, n in zip(xs, names):
      ax_err.annotate(f"{100 * agg[n][0]:.2f}", (x, 100 * agg[n][0]), textcoords="offset points",
                      xytext=(6, 4), fontsize=8)
      if n_runs > 1:
        ax_err.scatter([x] * n_runs, [100 * v for v in agg[n][2]], s=10, color="k", alpha=0.4, zorder=3)
  if "Teacher" in agg:
    ax_err.axhline(100 * agg["Teacher"][0], color="gray", linestyle="--", linewidth=1, label="teacher")
  ax_err.set_xticks([_gen_of(n) for n in gens], gens)
  ax_err.set_ylabel("test error (%)")
  ax_err.set_title("Final test error per generation")
  ax_err.grid(alpha=0.3)
  ax_err.legend(fontsize=8)
  # Right: per-epoch curves of all generations overlaid (mean and std band over runs).
  labels = []
  for i, name in enumerate(gens):
    gen = _gen_of(name)
    curves = [curve(r.histories[gen]) for r in runs if r.histories.get(gen)]
    if not curves:
      continue
    n = min(len(c[0]) for c in curves)
    epochs = curves[0][0][:n]
    errs = np.stack([c[1][:n] for c in curves])
    source = curves[0][2]
    label = f"{name} ({'validation' if source == 'val' else 'train: no val split'})"
    ax_curve.plot(epochs, errs.mean(0), color=f"C{i}", label=label, marker="." if n < 30 else None)
    if len(curves) > 1:
      ax_curve.fill_between(epochs, errs.mean(0) - errs.std(0, ddof=1), errs.mean(0) + errs.std(0, ddof=1),
                            color=f"C{i}", alpha=0.2)
    labels.append(label)
  ax_curve.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax_curve.set_xlabel("epoch")
  ax_curve.set_ylabel("error (%)")
  ax_curve.set_title("Per-epoch error of every generation" + (f" (mean ± std, {n_runs} runs)" if n_runs > 1 else ""))
  ax_curve.grid(alpha=0.3)
  if labels:
    ax_curve.legend(fontsize=8)
  cfg = runs[0].config
  fig.suptitle(f"{cfg.get('dataset', '?')}: {cfg.get('teacher_arch') or cfg.get('arch', '?')} -> "
               f"{cfg.get('arch', '?')}, {cfg.get('resolved', {}).get('loss', cfg.get('loss', '?'))} "
               f"(T={cfg.get('temperature', '?')})" + (f", {n_runs} runs" if n_runs > 1 else
                                                       f", seed {cfg.get('seed', '?')}"))
  fig.tight_layout()
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
  fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  os.replace(tmp, path)
  return labels


def _session_hparams(run, entry, ensemble):
  cfg = run.config
  obj = entry.get("objective") or {"loss": cfg.get("resolved", {}).get("loss", cfg.get("loss", "")),
                                   "temperature": cfg.get("temperature", 1.0)}
  gen = entry["gen"] if not ensemble else max(entry["members"])
  return {"gen": int(gen), "role": entry.get("role") or entry["name"],
          "arch": "ensemble" if ensemble else entry["arch"], "loss": obj["loss"],
          "temperature": float(obj["temperature"]), "seed": int(cfg.get("seed", 0)),
          "dataset": cfg.get("dataset", "")}


def write_hparams(run):
  """One hparams session per generation (gen_k/tb) and ensemble (ensemble_k/tb).

  The metric is the test/error scalar the generation's run already holds (it is
  written here for ensembles). Files this function wrote before are replaced.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top

  def fresh_writer(logdir):
    for old in glob.glob(os.path.join(logdir, "*" + HPARAMS_SUFFIX)):
      os.remove(old)
    return tf.summary.create_file_writer(logdir, filename_suffix=HPARAMS_SUFFIX)

  # The experiment: names only (no domains), identical in every run dir, so a
  # parent logdir of many runs (TensorBoard picks any one experiment) still works.
  writer = fresh_writer(run.path)
  with writer.as_default():
    hp.hparams_config(hparams=[hp.HParam(n) for n in HPARAM_NAMES],
                      metrics=[hp.Metric(m, display_name=m) for m in METRICS])
  writer.close()
  epochs = int(run.config.get("epochs", 0))
  name = os.path.basename(os.path.normpath(run.path))  # trial ids stay distinct under a parent logdir
  for g in run.results["generations"]:
    writer = fresh_writer(os.path.join(run.path, f"gen_{g['gen']}", "tb"))
    with writer.as_default():
      hp.hparams(_session_hparams(run, g, False), trial_id=f"{name}/gen_{g['gen']}")
    writer.close()
  for e in run.results["ensembles"]:
    k = max(e["members"])
    logdir = os.path.join(run.path, f"ensemble_{k}", "tb")
    shutil.rmtree(logdir, ignore_errors=True)  # written only here
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default(step=epochs):
      hp.hparams(_session_hparams(run, e, True), trial_id=f"{name}/ensemble_{k}")
      tf.summary.scalar("test/accuracy", e["test_accuracy"])
      tf.summary.scalar("test/error", e["test_error"])
    writer.close()


def write_report(run_dirs, out_dir=None, hparams=True):
  """Writes results.md and report.png (and hparams for single runs); returns their paths.

  Args:
    run_dirs: a run directory, a parent of run directories, or a list of them.
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
  if len(runs) == 1 and out_dir is None:
    from ban_tf import generations  # pylint: disable=g-import-not-at-top  (it calls this module)
    out_dir = runs[0].path
    generations.write_results(out_dir, runs[0].results, config_from_dict(runs[0].config))
  else:
    out_dir = out_dir or default_out
    os.makedirs(out_dir, exist_ok=True)
    cfg = runs[0].config
    title = (f"# {cfg.get('dataset', '?')}: {len(runs)} runs "
             f"({', '.join(os.path.basename(os.path.normpath(r.path)) for r in runs)})\n\n"
             "Final-epoch test error, mean ± sample std (ddof=1) over runs.\n\n")
    export.write_text(title + summary_table(runs), os.path.join(out_dir, "results.md"))
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

  flags.DEFINE_string("run_dir", None, "A run directory, or a parent directory of several (seed) runs.")
  flags.DEFINE_list("run_dirs", [], "Several run directories to summarise together (mean and std).")
  flags.DEFINE_string("out_dir", None, "Where a multi-run summary goes (default: their common parent).")
  flags.DEFINE_bool("hparams", True, "Also write TensorBoard hparams summaries into the run directories.")
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
