"""The born-again sequence: teacher, BAN-1..N (each taught by the previous one's
SavedModel on disk), BANE ensembles, results.json and results.md.

Finished generations (DONE marker) are skipped on rerun; their SavedModel is
re-verified against its fingerprint before it teaches the next generation.
"""

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ban_tf import cluster
from ban_tf import export
from ban_tf import train


def ensemble_members(gen, include_teacher=False):
  """BANE-k averages generations 1..k (Eq. 4), optionally with the teacher."""
  return ([0] if include_teacher else []) + list(range(1, gen + 1))


def build_ensemble(members, name="ensemble"):
  """A model averaging the members' softmax probabilities (not their logits)."""
  inputs = keras.Input(shape=members[0].inputs[0].shape[1:], dtype="float32", name="images")
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
  res = model.evaluate(dataset.test(cfg.batch_size), verbose=0, return_dict=True)
  result = {"name": f"BANE-{k}", "members": gens, "test_accuracy": float(res["accuracy"]),
            "test_error": 1.0 - float(res["accuracy"]), "test_loss": float(res["loss"])}
  val = dataset.val(cfg.batch_size)
  if val is not None:
    vres = model.evaluate(val, verbose=0, return_dict=True)
    result["val_accuracy"] = float(vres["accuracy"])
  export.export_saved_model(model, os.path.join(out, "saved_model"), dataset.info.image_shape)
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
      logging.info("gen %d already done: skipping (verifying its SavedModel)", gen)
      export.verify_saved_model(os.path.join(done_dir, "saved_model"))
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
  return results


def format_params(n):
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def results_table(results):
  """The paper-style markdown table: teacher, BAN-k, BANE-k, delta vs teacher."""
  gens = results["generations"]
  base = gens[0]["test_error"] if gens else None
  has_val = any("val_accuracy" in g for g in gens)
  head = "| Model | Arch | Params | Test error (%) | Δ vs teacher |" + (" Val error (%) |" if has_val else "")
  lines = [head, "|---|---|---|---|---|" + ("---|" if has_val else "")]

  def row(name, arch, params, err, val_acc):
    delta = "" if base is None or name == "Teacher" else f"{100 * (err - base):+.2f}"
    cells = [name, arch, params, f"{100 * err:.2f}", delta]
    if has_val:
      cells.append("" if val_acc is None else f"{100 * (1 - val_acc):.2f}")
    return "| " + " | ".join(cells) + " |"

  for g in gens:
    name = "Teacher" if g["gen"] == 0 else f"BAN-{g['gen']}"
    lines.append(row(name, g["arch"], format_params(g["params"]), g["test_error"], g.get("val_accuracy")))
  for e in results["ensembles"]:
    members = ",".join("T" if m == 0 else str(m) for m in e["members"])
    lines.append(row(f"{e['name']} ({members})", "ensemble", "", e["test_error"], e.get("val_accuracy")))
  return "\n".join(lines) + "\n"


def write_results(run_dir, results, cfg):
  clean = {
      "generations": [{k: g[k] for k in ("gen", "role", "arch", "params", "test_accuracy", "test_error",
                                          "val_accuracy", "epochs", "seconds", "seed", "objective", "teacher")
                       if k in g} for g in results["generations"]],
      "ensembles": [{k: e[k] for k in ("name", "members", "test_accuracy", "test_error", "val_accuracy") if k in e}
                    for e in results["ensembles"]],
      "dataset": cfg.dataset,
      "seed": cfg.seed,
  }
  export.write_json(clean, os.path.join(run_dir, "results.json"))
  title = (f"# {cfg.dataset}: {cfg.arch_for(0)} teacher -> {cfg.arch} students, objective "
           f"{cfg.resolved_loss} (T={cfg.temperature}), seed {cfg.seed}\n\n"
           "Final-epoch test error; no checkpoint selection.\n\n")
  export.write_text(title + results_table(results), os.path.join(run_dir, "results.md"))
  return clean
