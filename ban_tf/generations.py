"""The born-again sequence: teacher, BAN-1..N (each taught by the previous one's
SavedModel on disk), BANE ensembles, results.json and results.md.

Finished generations (DONE marker) are skipped on rerun; their SavedModel was
re-verified against its fingerprint when the run directory was opened
(rundir.RunDir.verify_finished), and is again when it is loaded as a teacher.

Rows are named as in the paper's Table 2: Teacher, BAN-1..N, Ens*k (the BANE of
generations 1..k, Eq. 4, plus the teacher with --ensemble_include_teacher) and,
with --baseline, Baseline (BAN-1's architecture and seed trained on labels only).
`run_seeds` repeats the whole run for --seeds base seeds into seed_S/ and reports
mean +- sample standard deviation (ddof=1) of every row's test error.
"""

import contextlib
import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ban_tf import cluster
from ban_tf import distiller as distiller_lib
from ban_tf import export
from ban_tf import faults
from ban_tf import lm
from ban_tf import report
from ban_tf import train


def ensemble_members(gen, include_teacher=False):
  """BANE-k averages generations 1..k (Eq. 4), optionally with the teacher."""
  return ([0] if include_teacher else []) + list(range(1, gen + 1))


def build_ensemble(members, name="ensemble"):
  """A model averaging the members' softmax probabilities (not their logits)."""
  first = members[0].inputs[0]
  inputs = keras.Input(shape=first.shape[1:], dtype=first.dtype, name="inputs")
  probs = []
  for i, m in enumerate(members):
    wrapped = keras.Model(m.inputs[0], m.outputs[0], name=f"member_{i}")
    probs.append(keras.layers.Softmax(dtype="float32", name=f"probs_{i}")(wrapped(inputs)))
  mean = probs[0] if len(probs) == 1 else keras.layers.Average(dtype="float32", name="mean_probs")(probs)
  return keras.Model(inputs, mean, name=name)


def evaluate_ensemble(cfg, strategy, dataset, run, k):
  """Builds, evaluates and exports BANE-k; returns its metrics dict."""
  out = run.ensemble_dir(k)
  if export.is_done(run.read_ensemble_dir(k)):
    return export.read_json(os.path.join(run.read_ensemble_dir(k), "metrics.json"))
  os.makedirs(out, exist_ok=True)
  gens = ensemble_members(k, cfg.ensemble_include_teacher)
  # Multi-worker: every worker evaluates the whole test set on its own (outside the
  # strategy, no collectives); Keras cannot evaluate a plain model under MWMS.
  scope = contextlib.nullcontext() if cluster.is_multi_worker(strategy) else strategy.scope()
  with scope:
    members = [keras.saving.load_model(os.path.join(run.read_gen_dir(g), "model.keras"),
                                       custom_objects={"StepDecay": train.StepDecay}, compile=False)
               for g in gens]
    model = build_ensemble(members, name=f"bane_{k}")
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
  if cfg.task == "lm":
    with strategy.scope():
      result = dict(name=f"BANE-{k}", members=gens, **lm.evaluate_ensemble(model, dataset, cfg.batch_size))
    export.export_saved_model(model, os.path.join(out, "saved_model"), dataset.info.image_shape,
                              output_name=export.PROBABILITIES)
    lm.write_vocab(dataset.info.vocab, out)
    export.write_json(result, os.path.join(out, "metrics.json"))
    export.touch_done(out)
    logging.info("BANE-%d (generations %s): test perplexity %.2f", k, gens, result["test_perplexity"])
    return result
  # The Distiller's weighted, replica-summed metrics (data.py pads the last batch).
  with contextlib.nullcontext() if cluster.is_multi_worker(strategy) else strategy.scope():
    scorer = distiller_lib.probability_scorer(model)
  res = scorer.evaluate(dataset.test(cfg.batch_size), verbose=0, return_dict=True)
  result = {"name": f"BANE-{k}", "members": gens, "test_accuracy": float(res["accuracy"]),
            "test_error": 1.0 - float(res["accuracy"]), "test_loss": float(res["label_loss"])}
  val = dataset.val(cfg.batch_size)
  if val is not None:
    vres = scorer.evaluate(val, verbose=0, return_dict=True)
    result["val_accuracy"] = float(vres["accuracy"])
  export.export_saved_model(model, os.path.join(out, "saved_model"), dataset.info.image_shape,
                            class_names=dataset.info.class_names, output_name=export.PROBABILITIES)
  export.write_json(result, os.path.join(out, "metrics.json"))
  export.touch_done(out)
  logging.info("BANE-%d (generations %s): test accuracy %.4f", k, gens, result["test_accuracy"])
  return result


def run(cfg, strategy, dataset, run):
  """Trains generations 0..cfg.gens into `run`, an open (locked) rundir.RunDir."""
  results = {"generations": [], "ensembles": []}
  for gen in range(cfg.gens + 1):
    gdir, done_dir = run.gen_dir(gen), run.read_gen_dir(gen)
    # Every worker reads the same teacher: the chief's export of the previous generation.
    teacher_path = os.path.join(run.read_gen_dir(gen - 1), "saved_model") if gen > 0 else None
    if export.is_done(done_dir):
      logging.info("gen %d already done: skipping (its SavedModel matched its fingerprint)", gen)
      metrics = export.read_json(os.path.join(done_dir, "metrics.json"))
    else:
      metrics = train.train_generation(cfg, gen, strategy, dataset, gdir, teacher_path,
                                       read_dir=done_dir)
    cluster.barrier(strategy)  # the chief's gen_{gen} is complete before anyone reads it
    results["generations"].append(metrics)
    if gen >= 2:
      results["ensembles"].append(evaluate_ensemble(cfg, strategy, dataset, run, gen))
      cluster.barrier(strategy)
    write_results(run.path, results, cfg)
    faults.kill_if("kill_between_generations", f"gen_{gen}")
  if cfg.baseline:
    bdir, bdone = os.path.join(run.path, "baseline"), os.path.join(run.read_path, "baseline")
    if export.is_done(bdone):
      results["baseline"] = export.read_json(os.path.join(bdone, "metrics.json"))
    else:
      results["baseline"] = train.train_generation(cfg, 1, strategy, dataset, bdir, baseline=True,
                                                   read_dir=bdone)
    cluster.barrier(strategy)
    write_results(run.path, results, cfg)
  report.write_report(run.path)  # report.png and TensorBoard hparams, from what is on disk
  return results


def run_seeds(cfg, strategy, dataset, top):
  """--seeds=N: the whole run per base seed into run.path/seed_S/, then mean +- std."""
  from ban_tf import rundir  # pylint: disable=g-import-not-at-top
  per_seed = []
  for seed in cfg.seed_list():
    sub = dataclasses.replace(cfg, seed=seed, seeds=1,
                              run_dir=os.path.join(top.path, f"seed_{seed}"))
    logging.info("seed %d: %s", seed, sub.run_dir)
    with rundir.RunDir(sub.run_dir, sub, num_classes=dataset.info.num_classes) as sub_run:
      per_seed.append(run(sub, strategy, dataset, sub_run))
  summary = {"seeds": cfg.seed_list(), "rows": aggregate([table_rows(r) for r in per_seed])}
  export.write_json(summary, os.path.join(top.path, "results.json"))
  title = (f"# {cfg.dataset}: {cfg.arch_for(0)} teacher -> {cfg.arch_for(1)} students, objective "
           f"{cfg.resolved_loss} (T={cfg.temperature}), seeds {', '.join(map(str, cfg.seed_list()))}\n\n"
           "Final-epoch test error, mean +- std (ddof=1) over seeds; per-seed tables in seed_S/results.md.\n\n")
  export.write_text(title + aggregate_table(summary["rows"]), os.path.join(top.path, "results.md"))
  return summary


def format_params(n):
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def ensemble_label(members):
  """Table 2's column name, Ens*k for k members, then the members (T = teacher).

  E.g. "Ens*3 (1,2,3)", or "Ens*3 (T,1,2)" as in Table 2's DenseNet-80-120 row.
  """
  return f"Ens*{len(members)} (" + ",".join("T" if m == 0 else str(m) for m in members) + ")"


def table_rows(results):
  """(name, arch, params, test_error, val_accuracy or None) per row, in table order."""
  rows = []
  for g in results["generations"]:
    name = "Teacher" if g["gen"] == 0 else f"BAN-{g['gen']}"
    rows.append((name, g["arch"], format_params(g["params"]), g["test_error"], g.get("val_accuracy")))
  for e in results["ensembles"]:
    rows.append((ensemble_label(e["members"]), "ensemble", "", e["test_error"], e.get("val_accuracy")))
  if results.get("baseline"):
    b = results["baseline"]
    rows.append(("Baseline", b["arch"], format_params(b["params"]), b["test_error"], b.get("val_accuracy")))
  return rows


def results_table(results):
  """The paper-style markdown table: Teacher, BAN-k, Ens*k, Baseline, delta vs teacher."""
  rows = table_rows(results)
  base = rows[0][3] if rows and rows[0][0] == "Teacher" else None
  has_val = any(r[4] is not None for r in rows)
  head = "| Model | Arch | Params | Test error (%) | Δ vs teacher |" + (" Val error (%) |" if has_val else "")
  lines = [head, "|---|---|---|---|---|" + ("---|" if has_val else "")]
  for name, arch, params, err, val_acc in rows:
    delta = "" if base is None or name == "Teacher" else f"{100 * (err - base):+.2f}"
    cells = [name, arch, params, f"{100 * err:.2f}", delta]
    if has_val:
      cells.append("" if val_acc is None else f"{100 * (1 - val_acc):.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def aggregate(per_seed_rows):
  """Mean and sample std (ddof=1; 0 for one seed) of each row's test error, in %."""
  order, errs, archs = [], {}, {}
  for rows in per_seed_rows:
    for name, arch, params, err, _ in rows:
      if name not in errs:
        order.append(name)
        errs[name], archs[name] = [], (arch, params)
      errs[name].append(100.0 * err)
  out = []
  for name in order:
    e = np.asarray(errs[name], dtype=np.float64)
    out.append({"name": name, "arch": archs[name][0], "params": archs[name][1], "n": int(e.size),
                "test_error_mean": float(e.mean()),
                "test_error_std": float(e.std(ddof=1)) if e.size > 1 else 0.0,
                "test_errors": e.tolist()})
  return out


def aggregate_table(rows):
  lines = ["| Model | Arch | Params | Test error (%) mean ± std | Seeds |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['arch']} | {r['params']} | "
                 f"{r['test_error_mean']:.2f} ± {r['test_error_std']:.2f} | {r['n']} |")
  return "\n".join(lines) + "\n"


_LM_KEYS = ("val_perplexity", "test_perplexity")  # language models (cfg.task == "lm")


def write_results(run_dir, results, cfg):
  clean = {
      "generations": [{k: g[k] for k in ("gen", "role", "arch", "params", "test_accuracy", "test_error",
                                          "val_accuracy", "epochs", "seconds", "seed", "objective", "teacher")
                       + _LM_KEYS if k in g} for g in results["generations"]],
      "ensembles": [{k: e[k] for k in ("name", "members", "test_accuracy", "test_error", "val_accuracy")
                     + _LM_KEYS if k in e} for e in results["ensembles"]],
      "baseline": ({k: v for k, v in results["baseline"].items() if k != "final_train"}
                   if results.get("baseline") else None),
      "dataset": cfg.dataset,
      "seed": cfg.seed,
  }
  export.write_json(clean, os.path.join(run_dir, "results.json"))
  title = (f"# {cfg.dataset}: {cfg.arch_for(0)} teacher -> {cfg.arch_for(1)} students, objective "
           f"{cfg.resolved_loss} (T={cfg.temperature}), seed {cfg.seed}\n\n"
           "Final-epoch test error; no checkpoint selection.\n\n")
  if cfg.task == "lm":
    title = title.replace("test error", "perplexity (per token)")
  table = lm.results_table(results) if cfg.task == "lm" else results_table(results)
  export.write_text(title + table, os.path.join(run_dir, "results.md"))
  return clean
