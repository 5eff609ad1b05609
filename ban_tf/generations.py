"""The born-again sequence: teacher, BAN-1..N (each taught by the previous one's
SavedModel on disk), BANE ensembles, results.json and results.md.

With --teacher=PATH, generation 0 is PATH, imported into gen_0/ (pretrained.py)
instead of trained. The loop only: what a generation is (GenerationSpec) and how it trains live in
train.py, what differs between tasks in tasks/, the tables in results.py and the
files a finished run gets (results.md, report.png) in report.py.

Finished generations (DONE marker) are skipped on rerun; their SavedModel was
re-verified against its fingerprint when the run directory was opened
(rundir.RunDir.verify_finished), and is again when it is loaded as a teacher.

Rows are named as in the paper's Table 2 (results.py): Teacher, BAN-1..N, Ens*k
(the BANE of generations 1..k, Eq. 4, plus the teacher with
--ensemble_include_teacher) and, with --baseline, Baseline (BAN-1's architecture
and seed trained on labels only). `run_seeds` repeats the whole run for --seeds
base seeds into seed_S/ and reports mean +- sample standard deviation (ddof=1) of
every row's headline metric (the task's: test error, or test perplexity).
"""

import contextlib
import dataclasses
import os

import keras
import numpy as np
from absl import logging

from ban_tf import cluster
from ban_tf import console
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import faults
from ban_tf import pretrained
from ban_tf import report
from ban_tf import results as results_lib
from ban_tf import tasks
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


def build_stateful_ensemble(members, name="ensemble_stateful"):
  """build_ensemble of stateful members ([x, state_i] -> [logits, state_i]).

  Returns [x, state] -> [mean probabilities, state], the state being the members'
  states concatenated in member order (each member carries its own).
  """
  sizes = [int(m.inputs[1].shape[-1]) for m in members]
  first = members[0].inputs[0]
  inputs = keras.Input(shape=first.shape[1:], dtype=first.dtype, name="inputs")
  state = keras.Input(shape=(sum(sizes),), dtype="float32", name="state")
  probs, states, offset = [], [], 0
  for i, (m, size) in enumerate(zip(members, sizes)):
    part = keras.layers.Lambda(lambda s, a=offset, n=size: s[:, a:a + n], name=f"state_{i}")(state)
    offset += size
    logits, out = m([inputs, part])
    probs.append(keras.layers.Softmax(dtype="float32", name=f"probs_{i}")(logits))
    states.append(out)
  mean = probs[0] if len(probs) == 1 else keras.layers.Average(dtype="float32", name="mean_probs")(probs)
  out = states[0] if len(states) == 1 else keras.layers.Concatenate(dtype="float32", name="states")(states)
  return keras.Model([inputs, state], [mean, out], name=name)


def _load_member(gen_dir):
  """A generation as a keras.Model to logits: its model.keras, or (a --teacher imported
  from a SavedModel, or one that outputs probabilities) its SavedModel's `serve` endpoint."""
  path = os.path.join(gen_dir, "model.keras")
  if os.path.exists(path):
    return keras.saving.load_model(path, custom_objects={"StepDecay": train.StepDecay}, compile=False)
  layer = keras.layers.TFSMLayer(os.path.join(gen_dir, "saved_model"), call_endpoint=export.SERVE,
                                 trainable=False, dtype="float32")
  x = np.load(os.path.join(gen_dir, "saved_model", export.FINGERPRINT_FILE))["inputs"]
  inputs = keras.Input(shape=x.shape[1:], dtype=x.dtype.name)
  return keras.Model(inputs, layer(inputs), name=os.path.basename(gen_dir))


def evaluate_ensemble(cfg, strategy, dataset, run, k):
  """Builds, evaluates and exports BANE-k; returns its metrics dict."""
  task = tasks.get(cfg.task)
  out = run.ensemble_dir(k)
  if export.is_done(run.read_ensemble_dir(k)):
    return export.read_json(os.path.join(run.read_ensemble_dir(k), "metrics.json"))
  os.makedirs(out, exist_ok=True)
  gens = ensemble_members(k, cfg.ensemble_include_teacher)
  # Multi-worker: every worker evaluates the whole test set on its own (outside the
  # strategy, no collectives); Keras cannot evaluate a plain model under MWMS.
  scope = contextlib.nullcontext() if cluster.is_multi_worker(strategy) else strategy.scope()
  with scope:
    members = [_load_member(run.read_gen_dir(g)) for g in gens]
    model = build_ensemble(members, name=f"bane_{k}")
    stateful = None
    if task.carries_state(cfg):  # every member carries its own state over the stream
      views = [task.stateful_model(m) for m in members]
      if any(v is None for v in views):
        raise errors.TeacherError(
            f"BANE-{k}: generation {gens[views.index(None)]} has no model.keras to carry the LSTM state with "
            "(a --teacher imported from a SavedModel): drop --ensemble_include_teacher or use --lm_state=reset")
      stateful = build_stateful_ensemble(views, name=f"bane_{k}_stateful")
    # The Distiller's weighted, replica-summed metrics (data.py pads the last batch).
    scorer = distiller_lib.probability_scorer(model, perplexity=task.perplexity, stateful=stateful)
  result = dict(name=f"BANE-{k}", members=gens, **train.evaluate_splits(scorer, dataset, cfg.batch_size))
  train.finish(task, task.spec(dataset), model, out, result, output_name=export.PROBABILITIES,
               stateful=stateful)
  export.write_json(result, os.path.join(out, "metrics.json"))
  export.touch_done(out)
  logging.info("BANE-%d (generations %s): test accuracy %.4f, %s %.4f", k, gens, result["test_accuracy"],
               task.headline.key, result[task.headline.key])
  if console.progress():
    console.progress().print(f"{console.progress().prefix}BANE-{k} ({results_lib.ensemble_arch(gens)}): "
                             f"{train.headline_text(task, result)}")
  return result


def run(cfg, strategy, dataset, run):
  """Trains generations 0..cfg.gens into `run`, an open (locked) rundir.RunDir."""
  results = {"generations": [], "ensembles": []}
  for gen in range(cfg.gens + 1):
    done_dir = run.read_gen_dir(gen)
    # Every worker reads the same teacher: the chief's export of the previous generation.
    teacher_path = os.path.join(run.read_gen_dir(gen - 1), "saved_model") if gen > 0 else None
    if export.is_done(done_dir):
      logging.info("gen %d already done: skipping (its SavedModel matched its fingerprint)", gen)
      metrics = export.read_json(os.path.join(done_dir, "metrics.json"))
      if console.progress():
        console.progress().skip(cfg.epochs, f"gen {gen}/{cfg.gens} {metrics.get('role', gen)}: done before, skipped")
    elif gen == 0 and cfg.teacher:  # a pretrained teacher: imported, checked and measured, not trained
      metrics = pretrained.import_teacher(cfg, strategy, dataset, run.gen_dir(0))
      if console.progress():
        console.progress().skip(cfg.epochs, f"gen 0/{cfg.gens} teacher: imported from {cfg.teacher}")
    else:
      spec = train.GenerationSpec.generation(cfg, gen, run.gen_dir(gen), teacher_path, read_dir=done_dir)
      metrics = train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)  # the chief's gen_{gen} is complete before anyone reads it
    results["generations"].append(metrics)
    if gen >= 2:
      results["ensembles"].append(evaluate_ensemble(cfg, strategy, dataset, run, gen))
      cluster.barrier(strategy)
    report.write_results(run.path, results, cfg, spec=run.spec)
    faults.kill_if("kill_between_generations", f"gen_{gen}")
  if cfg.baseline:
    bdir, bdone = os.path.join(run.path, "baseline"), os.path.join(run.read_path, "baseline")
    if export.is_done(bdone):
      results["baseline"] = export.read_json(os.path.join(bdone, "metrics.json"))
      if console.progress():
        console.progress().skip(cfg.epochs, "baseline: done before, skipped")
    else:
      spec = train.GenerationSpec.baseline(cfg, bdir, read_dir=bdone)
      results["baseline"] = train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)
    report.write_results(run.path, results, cfg, spec=run.spec)
  report.write_report(run.path)  # report.png and TensorBoard hparams, from what is on disk
  return results


def run_seeds(cfg, strategy, dataset, top):
  """--seeds=N: the whole run per base seed into top.path/seed_S/, then mean +- std.

  The parent's results.json holds {"seeds", "metric", "rows"} (results.aggregate
  of the task's headline metric); its results.md and report.png are report.py's.
  """
  from ban_tf import rundir  # pylint: disable=g-import-not-at-top
  task = tasks.get(cfg.task)
  spec = task.spec(dataset)
  per_seed = []
  for i, seed in enumerate(cfg.seed_list()):
    # --student_seed moves with the base seed, so each seed's students differ too.
    student_seed = None if cfg.student_seed is None else cfg.student_seed + seed - cfg.seed
    sub = dataclasses.replace(cfg, seed=seed, seeds=1, student_seed=student_seed,
                              run_dir=os.path.join(top.path, f"seed_{seed}"))
    logging.info("seed %d: %s", seed, sub.run_dir)
    if console.progress():
      console.progress().prefix = f"seed {seed} ({i + 1}/{cfg.seeds}) "
    with rundir.RunDir(sub.run_dir, sub, spec=spec) as sub_run:
      per_seed.append(run(sub, strategy, dataset, sub_run))
  summary = {"seeds": cfg.seed_list(), "metric": task.headline.key,
             "rows": results_lib.aggregate(per_seed, task.headline)}
  export.write_json(summary, os.path.join(top.path, "results.json"))
  report.write_report(top.path, hparams=False)  # results.md and report.png of the seeds
  return summary
