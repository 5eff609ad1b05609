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
import functools
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
from ban_tf import pretrained
from ban_tf import report
from ban_tf import results as results_lib
from ban_tf import rundir
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


def _load_member(member):
  """A generation (a rundir.ModelDir) as a keras.Model to logits: its model.keras, or (a
  --teacher imported from a SavedModel, or one that outputs probabilities) its SavedModel's
  `serve` endpoint.

  Raises:
    errors.TeacherError: (one line) it cannot be loaded (a truncated zip, a bad config, ...).
  """
  path = member.read_keras
  try:
    if os.path.exists(path):
      return keras.saving.load_model(
        path, custom_objects={"StepDecay": train.StepDecay}, compile=False
      )
    path = member.read_saved_model
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
  return keras.Model(inputs, layer(inputs), name=member.name)


def evaluate_ensemble(cfg, strategy, dataset, run, k):
  """Builds, evaluates and exports BANE-k; returns its metrics dict."""
  task = tasks.get(cfg.task)
  out = run.ensemble(k)
  if out.is_done and k not in run.stale_ensembles:
    return out.read_metrics()  # checked readable on open
  gens = ensemble_members(k, cfg.ensemble_include_teacher)
  for g in gens:  # the members' model.keras must be the ones this run recorded
    run.check_member(g, keras=True)
  # Multi-worker: every worker evaluates the whole test set on its own (outside the
  # strategy, no collectives); Keras cannot evaluate a plain model under MWMS.
  scope = contextlib.nullcontext() if cluster.is_multi_worker(strategy) else strategy.scope()
  with scope:
    members = [_load_member(run.generation(g)) for g in gens]
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
    name=f"BANE-{k}", members=gens, **distiller_lib.evaluate_splits(scorer, dataset, cfg.batch_size)
  )
  out.seal(
    task,
    task.spec(dataset),
    result,
    model=model,
    output_name=export.PROBABILITIES,
    stateful=stateful if stateful is not None else task.stateful_model(model),
    outputs=functools.partial(task.store_predictions, cfg, dataset, probabilities=True),
  )
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


def collect_results(run):
  """The run's results dict, rebuilt from every readable file under run.read_path.

  Rows: every generation and ensemble that is finished on disk (DONE and recorded in
  the manifest, whatever --gens this run has) or that the previous results.json held.
  A row whose files are unreadable, or whose directory is no longer finished, keeps
  its previous values (when there were any) and gets a "damaged" field saying why;
  results.py marks it. A DONE directory the manifest does not record (a copy of
  another generation's) is no row of this run.
  """
  previous, why = _readable_results(run)
  previous = previous or {}

  def by(rows, key):
    return {key(r): r for r in rows if isinstance(r, dict)} if isinstance(rows, list) else {}

  def row(model, prev, stub, done=None):
    done = model.is_finished if done is None else done
    if done:
      entry, bad = model.metrics_or_why()
      if entry is not None:
        return entry
    else:
      bad = f"{model.name} is not finished on disk (deleted, or being retrained)"
    if prev is None and not done:
      return None
    return dict(
      prev or stub, damaged=bad + ("; values from the previous results.json" if prev else "")
    )

  out = {"generations": [], "ensembles": [], "baseline": None}
  prev_g = by(previous.get("generations"), lambda r: r.get("gen"))
  for k in sorted(set(run.finished_gens()) | {g for g in prev_g if isinstance(g, int)}):
    r = row(run.generation(k), prev_g.get(k), {"gen": k})
    if r is not None:
      out["generations"].append(r)
  prev_e = by(previous.get("ensembles"), lambda r: r.get("name"))
  prev_e = {
    int(n.split("-")[1]): r
    for n, r in prev_e.items()
    if isinstance(n, str) and re.fullmatch(r"BANE-\d+", n)
  }
  for k in sorted(set(run.finished_ensembles()) | set(prev_e)):
    stub = {
      "name": f"BANE-{k}",
      "members": prev_e.get(k, {}).get("members") or list(range(1, k + 1)),
    }
    e = run.ensemble(k)
    r = row(e, prev_e.get(k), stub, done=e.is_finished and k not in run.stale_ensembles)
    if r is not None:
      out["ensembles"].append(r)
  b = run.baseline()
  prev_b = previous.get("baseline") if isinstance(previous.get("baseline"), dict) else None
  if b.is_finished or prev_b:
    out["baseline"] = row(b, prev_b, {"gen": "baseline"})
  return out


def _readable_results(run):
  """(the previous results.json, None) or (None, why it cannot be used)."""
  if not os.path.exists(run.results_path):
    return None, None
  try:
    return export.read_json_checked(
      run.results_path, "restore it, or delete its directory to retrain it"
    ), None
  except errors.UsageError as e:
    logging.warning("%s: rebuilding it from the generation directories", e)
    return None, str(e)


def run(cfg, strategy, dataset, run):
  """Trains generations 0..cfg.gens into `run`, an open (locked) rundir.RunDir."""
  for gen in range(cfg.gens + 1):
    model = run.generation(gen)
    if model.is_done:
      logging.info(
        "gen %d already done: skipping (its SavedModel matched its fingerprint and the run's "
        "manifest)",
        gen,
      )
      metrics = model.read_metrics()  # checked readable on open
      if console.progress():  # an imported teacher's epochs were never this run's to train
        console.progress().skip(
          cfg.epochs if cfg.trains(gen) else 0,
          f"gen {gen}/{cfg.gens} {metrics.get('role', gen)}: done before, skipped",
        )
    elif (
      gen == 0 and cfg.teacher
    ):  # a pretrained teacher: imported, checked and measured, not trained
      pretrained.import_teacher(cfg, strategy, dataset, model)
      if console.progress():
        console.progress().skip(  # not trained here: no epochs counted (Config.trained_epochs)
          0, f"gen 0/{cfg.gens} teacher: imported from {cfg.resolved_teacher}"
        )
    else:
      teacher_path = None
      if (
        gen > 0
      ):  # the teacher (and, for --share_stem_head, its model.keras) is this run's gen_{gen-1}
        run.check_member(gen - 1, keras=cfg.share_stem_head)
        # Every worker reads the same teacher: the chief's export of the previous generation.
        teacher_path = run.generation(gen - 1).read_saved_model
      spec = train.GenerationSpec.generation(
        cfg, gen, model.path, teacher_path, read_dir=model.read
      )
      train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)  # the chief's gen_{gen} is complete before anyone reads it
    if gen >= 2:
      evaluate_ensemble(cfg, strategy, dataset, run, gen)
      cluster.barrier(strategy)
    report.write_results(run.path, collect_results(run), cfg, spec=run.spec)
    faults.kill_if("kill_between_generations", model.name)
  if cfg.baseline:
    baseline = run.baseline()
    if baseline.is_done:
      if console.progress():
        console.progress().skip(cfg.epochs, "baseline: done before, skipped")
    else:
      spec = train.GenerationSpec.baseline(cfg, baseline.path, read_dir=baseline.read)
      train.run_generation(cfg, spec, strategy, dataset)
    cluster.barrier(strategy)
  results = collect_results(run)
  report.write_results(run.path, results, cfg, spec=run.spec)
  report.write_report(run.path)  # report.png and TensorBoard hparams, from what is on disk
  return results


def run_seeds(cfg, strategy, dataset, top):
  """--seeds=N: the whole run per base seed into top.path/seed_S/, then mean +- std.

  The parent's results.json holds {"seeds", "teacher_per_seed", "metric", "rows"}
  (results.aggregate of the task's headline metric; `teacher_per_seed`:
  Config.teacher_per_seed); its results.md and report.png are report.py's. Each
  seed run imports its own --teacher when it has `{seed}` (Config.for_seed).
  """
  task = tasks.get(cfg.task)
  spec = task.spec(dataset)
  per_seed = []
  for i, seed in enumerate(cfg.seed_list()):
    sub = cfg.for_seed(seed, top.path)  # its own --student_seed and {seed} teacher
    logging.info("seed %d: %s", seed, sub.run_dir)
    if console.progress():
      console.progress().prefix = f"seed {seed} ({i + 1}/{cfg.seeds}) "
    with rundir.RunDir(sub.run_dir, sub, spec=spec) as sub_run:
      per_seed.append(run(sub, strategy, dataset, sub_run))
  summary = {
    "seeds": cfg.seed_list(),
    # False: one fixed --teacher for every seed (the spread excludes the teacher's variance).
    "teacher_per_seed": cfg.teacher_per_seed,
    "metric": task.headline.key,
    # Mean ± std, and the over-seed paired deltas (report.aggregate, from each seed's results.json).
    "rows": report.aggregate(
      [report.load_run(top.seed_run(s)) for s in cfg.seed_list()],
      task.headline,
    ),
  }
  top.write_results(summary)
  report.write_report(top.path, hparams=False)  # results.md and report.png of the seeds
  return summary
