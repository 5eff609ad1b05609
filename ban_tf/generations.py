"""The born-again sequence: teacher, BAN-1..N (each taught by the previous one's
SavedModel on disk), BANE ensembles, results.json and results.md.

With --teacher=PATH, generation 0 is PATH, imported into gen_0/ (pretrained.py)
instead of trained. The loop only: what a generation is (GenerationSpec) and how it trains live in
train.py, what differs between tasks in tasks/, the tables in results.py and the
files a finished run gets (results.md, report.png) in report.py.

Finished generations (DONE marker) are skipped on rerun; their SavedModel was
re-verified against its fingerprint and the run's manifest (manifest.py) when the
run directory was opened (rundir.RunDir.verify_finished), and is again when it is
loaded as a teacher; ensemble members' model.keras files are re-hashed before they
are loaded.

results.json and results.md are rebuilt after every generation from every
readable file of the run (`collect_results`), never from memory alone: a row that
was there is never lost (a damaged or vanished generation keeps its previous row,
marked "damaged"), and a rerun with a smaller --gens keeps the later rows.

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
import re

import keras
import numpy as np
from absl import logging

from ban_tf import carry
from ban_tf import cluster
from ban_tf import console
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import faults
from ban_tf import manifest
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
  mean = (
    probs[0] if len(probs) == 1 else keras.layers.Average(dtype="float32", name="mean_probs")(probs)
  )
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
    part = keras.layers.Lambda(lambda s, a=offset, n=size: s[:, a : a + n], name=f"state_{i}")(
      state
    )
    offset += size
    logits, out = m([inputs, part])
    probs.append(keras.layers.Softmax(dtype="float32", name=f"probs_{i}")(logits))
    states.append(out)
  mean = (
    probs[0] if len(probs) == 1 else keras.layers.Average(dtype="float32", name="mean_probs")(probs)
  )
  out = (
    states[0]
    if len(states) == 1
    else keras.layers.Concatenate(dtype="float32", name="states")(states)
  )
  return keras.Model([inputs, state], [mean, out], name=name)


def _load_member(gen_dir):
  """A generation as a keras.Model to logits: its model.keras, or (a --teacher imported
  from a SavedModel, or one that outputs probabilities) its SavedModel's `serve` endpoint.

  Raises:
    errors.TeacherError: (one line) it cannot be loaded (a truncated zip, a bad config, ...).
  """
  path = os.path.join(gen_dir, "model.keras")
  try:
    if os.path.exists(path):
      return keras.saving.load_model(
        path, custom_objects={"StepDecay": train.StepDecay}, compile=False
      )
    path = os.path.join(gen_dir, "saved_model")
    layer = keras.layers.TFSMLayer(
      path, call_endpoint=export.SERVE, trainable=False, dtype="float32"
    )
    x = np.load(os.path.join(path, export.FINGERPRINT_FILE))["inputs"]
  except Exception as e:  # pylint: disable=broad-except  (many kinds)
    raise errors.TeacherError(
      f"{path} cannot be loaded ({type(e).__name__}): restore it, or delete its "
      "generation directory to retrain it, or --overwrite"
    ) from None
  inputs = keras.Input(shape=x.shape[1:], dtype=x.dtype.name)
  return keras.Model(inputs, layer(inputs), name=os.path.basename(gen_dir))


def evaluate_ensemble(cfg, strategy, dataset, run, k):
  """Builds, evaluates and exports BANE-k; returns its metrics dict."""
  task = tasks.get(cfg.task)
  out = run.ensemble_dir(k)
  if export.is_done(run.read_ensemble_dir(k)) and k not in run.stale_ensembles:
    return export.read_json(os.path.join(run.read_ensemble_dir(k), "metrics.json"))
  os.makedirs(out, exist_ok=True)
  gens = ensemble_members(k, cfg.ensemble_include_teacher)
  for g in gens:  # the members' model.keras must be the ones this run recorded
    run.check_member(g, keras=True)
  # Multi-worker: every worker evaluates the whole test set on its own (outside the
  # strategy, no collectives); Keras cannot evaluate a plain model under MWMS.
  scope = contextlib.nullcontext() if cluster.is_multi_worker(strategy) else strategy.scope()
  with scope:
    members = [_load_member(run.read_gen_dir(g)) for g in gens]
    model = build_ensemble(members, name=f"bane_{k}")
    try:  # where the task carries state, every member carries its own over the stream
      stateful = task.carry(cfg).ensemble(
        members, lambda views: build_stateful_ensemble(views, name=f"bane_{k}_stateful")
      )
    except carry.MissingState as e:
      raise errors.TeacherError(
        f"BANE-{k}: generation {gens[e.index]} has no model.keras to carry the LSTM state with "
        "(a --teacher imported from a SavedModel): drop --ensemble_include_teacher or use --lm_state=reset"
      ) from None
    # The Distiller's weighted, replica-summed metrics (data.py pads the last batch).
    scorer = distiller_lib.probability_scorer(model, perplexity=task.perplexity, stateful=stateful)
  result = dict(
    name=f"BANE-{k}", members=gens, **train.evaluate_splits(scorer, dataset, cfg.batch_size)
  )
  train.finish(
    task,
    task.spec(dataset),
    model,
    out,
    result,
    output_name=export.PROBABILITIES,
    stateful=stateful,
  )
  export.write_json(result, os.path.join(out, "metrics.json"))
  manifest.record(run.path, f"ensemble_{k}", **manifest.digests(out, keras=False))
  export.touch_done(out)
  run.stale_ensembles.discard(k)
  logging.info(
    "BANE-%d (generations %s): test accuracy %.4f, %s %.4f",
    k,
    gens,
    result["test_accuracy"],
    task.headline.key,
    result[task.headline.key],
  )
  if console.progress():
    console.progress().print(
      f"{console.progress().prefix}BANE-{k} ({results_lib.ensemble_arch(gens)}): "
      f"{train.headline_text(task, result)}"
    )
  return result


def _readable(path):
  """(the JSON object in `path`, None) or (None, why it cannot be used)."""
  try:
    return export.read_json_checked(path, "restore it, or delete its directory to retrain it"), None
  except errors.UsageError as e:
    return None, str(e)


def collect_results(run):
  """The run's results dict, rebuilt from every readable file under run.read_path.

  Rows: every generation and ensemble that is finished on disk (whatever --gens
  this run has) or that the previous results.json held. A row whose files are
  unreadable, or whose directory is no longer finished, keeps its previous values
  (when there were any) and gets a "damaged" field saying why; results.py marks it.
  """
  previous, why = _readable(os.path.join(run.read_path, "results.json"))
  if why and os.path.exists(os.path.join(run.read_path, "results.json")):
    logging.warning("%s: rebuilding it from the generation directories", why)
  previous = previous or {}

  def by(rows, key):
    return {key(r): r for r in rows if isinstance(r, dict)} if isinstance(rows, list) else {}

  def row(directory, done, prev, stub, what):
    if done:
      entry, bad = _readable(os.path.join(directory, "metrics.json"))
      if entry is not None:
        return entry
    else:
      bad = f"{what} is not finished on disk (deleted, or being retrained)"
    if prev is None and not done:
      return None
    return dict(
      prev or stub, damaged=bad + ("; values from the previous results.json" if prev else "")
    )

  out = {"generations": [], "ensembles": [], "baseline": None}
  prev_g = by(previous.get("generations"), lambda r: r.get("gen"))
  for k in sorted(set(run.finished_gens()) | {g for g in prev_g if isinstance(g, int)}):
    r = row(
      run.read_gen_dir(k),
      export.is_done(run.read_gen_dir(k)),
      prev_g.get(k),
      {"gen": k},
      f"gen_{k}",
    )
    if r is not None:
      out["generations"].append(r)
  prev_e = by(previous.get("ensembles"), lambda r: r.get("name"))
  prev_e = {
    int(n.split("-")[1]): r
    for n, r in prev_e.items()
    if isinstance(n, str) and re.fullmatch(r"BANE-\d+", n)
  }
  for k in sorted(set(run.finished_ensembles()) | set(prev_e)):
    d = run.read_ensemble_dir(k)
    stub = {
      "name": f"BANE-{k}",
      "members": prev_e.get(k, {}).get("members") or list(range(1, k + 1)),
    }
    done = export.is_done(d) and k not in run.stale_ensembles
    r = row(d, done, prev_e.get(k), stub, f"ensemble_{k}")
    if r is not None:
      out["ensembles"].append(r)
  bdir = os.path.join(run.read_path, "baseline")
  prev_b = previous.get("baseline") if isinstance(previous.get("baseline"), dict) else None
  if export.is_done(bdir) or prev_b:
    out["baseline"] = row(bdir, export.is_done(bdir), prev_b, {"gen": "baseline"}, "baseline")
  return out


def run(cfg, strategy, dataset, run):
  """Trains generations 0..cfg.gens into `run`, an open (locked) rundir.RunDir."""
  for gen in range(cfg.gens + 1):
    done_dir = run.read_gen_dir(gen)
    # Every worker reads the same teacher: the chief's export of the previous generation.
    teacher_path = os.path.join(run.read_gen_dir(gen - 1), "saved_model") if gen > 0 else None
    if export.is_done(done_dir):
      logging.info(
        "gen %d already done: skipping (its SavedModel matched its fingerprint and the run's "
        "manifest)",
        gen,
      )
      metrics = export.read_json(os.path.join(done_dir, "metrics.json"))  # checked readable on open
      if console.progress():
        console.progress().skip(
          cfg.epochs, f"gen {gen}/{cfg.gens} {metrics.get('role', gen)}: done before, skipped"
        )
    elif (
      gen == 0 and cfg.teacher
    ):  # a pretrained teacher: imported, checked and measured, not trained
      pretrained.import_teacher(cfg, strategy, dataset, run.gen_dir(0))
      if console.progress():
        console.progress().skip(
          cfg.epochs, f"gen 0/{cfg.gens} teacher: imported from {cfg.teacher}"
        )
    else:
      if (
        gen > 0
      ):  # the teacher (and, for --share_stem_head, its model.keras) is this run's gen_{gen-1}
        run.check_member(gen - 1, keras=cfg.share_stem_head)
      spec = train.GenerationSpec.generation(
        cfg, gen, run.gen_dir(gen), teacher_path, read_dir=done_dir
      )
      train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)  # the chief's gen_{gen} is complete before anyone reads it
    if gen >= 2:
      evaluate_ensemble(cfg, strategy, dataset, run, gen)
      cluster.barrier(strategy)
    report.write_results(run.path, collect_results(run), cfg, spec=run.spec)
    faults.kill_if("kill_between_generations", f"gen_{gen}")
  if cfg.baseline:
    bdir, bdone = os.path.join(run.path, "baseline"), os.path.join(run.read_path, "baseline")
    if export.is_done(bdone):
      if console.progress():
        console.progress().skip(cfg.epochs, "baseline: done before, skipped")
    else:
      spec = train.GenerationSpec.baseline(cfg, bdir, read_dir=bdone)
      train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)
  results = collect_results(run)
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
    sub = dataclasses.replace(
      cfg,
      seed=seed,
      seeds=1,
      student_seed=student_seed,
      run_dir=os.path.join(top.path, f"seed_{seed}"),
    )
    logging.info("seed %d: %s", seed, sub.run_dir)
    if console.progress():
      console.progress().prefix = f"seed {seed} ({i + 1}/{cfg.seeds}) "
    with rundir.RunDir(sub.run_dir, sub, spec=spec) as sub_run:
      per_seed.append(run(sub, strategy, dataset, sub_run))
  summary = {
    "seeds": cfg.seed_list(),
    "metric": task.headline.key,
    "rows": results_lib.aggregate(per_seed, task.headline),
  }
  export.write_json(summary, os.path.join(top.path, "results.json"))
  report.write_report(top.path, hparams=False)  # results.md and report.png of the seeds
  return summary
