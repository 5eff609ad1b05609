"""The run directory: the one owner of what lies on disk.

Nothing else in ban_tf builds a path inside a run directory (`tests/layout_test.py`
holds the other modules to the names in layout.py, and those names to this layout).
`RunFiles` reads a run directory; `RunDir` also locks, checks and writes it; both hand
out a `ModelDir` per model (`run.generation(k)`, `run.ensemble(k)`, `run.baseline()`),
which knows its files, seals a finished model (`ModelDir.seal`, the one place the
order is written), finds and repairs checkpoints, and cuts history and TensorBoard
back to a checkpoint on resume.

Layout of a run directory (names: layout.py):

  .lock              the fcntl lock: "pid P on HOST" of the process using the directory
  config.json        the resolved flags (Config.to_dict; data paths absolute); a rerun must
                     match its experiment
  manifest.json      per finished model (gen_k, ensemble_k, baseline): the digests it must
                     still hash to (manifest.py); the truth of what is finished
  log.txt            every log line of every process that used the directory (console.py)
  gen_k/             generation k: 0 = the teacher (trained, or imported with --teacher), k = BAN-k
    saved_model/     fingerprinted SavedModel (export.py): serving_default {"pixels": float32
                     raw pixels [N,H,W,C] in 0..255, or "tokens": int32 [N,T]} -> {"logits"};
                     `serve` the same, bare; fingerprint.npz (its outputs on a fixed batch,
                     re-checked before it teaches); labels.txt (class names, in output order);
                     the task's assets (DataSpec.assets: vocab.txt of a language model)
    model.keras      the same model with stock Keras layers (keras.saving.load_model, no ban_tf)
    metrics.json     what it scored (val/test loss, accuracy, error, the task's derived
                     fields) and what it is (gen, role, arch, params, seed, objective,
                     teacher; an imported teacher's `source`: path, as given, kind, sha256)
    history.json     per epoch of a trained model: epoch, loss and its terms, accuracy,
                     val_*, learning_rate, seconds
    predictions.npz  per-example outputs on test (and val) for paired statistics: probabilities
                     and labels, or per-token NLL and sentence ids (predictions.py)
    ckpt/            epoch checkpoints (tf.train.CheckpointManager, the last two) while it
                     trains; removed once it is DONE
    DONE             written last: a rerun skips it
  ensemble_k/        BANE-k, the mean softmax of its members: saved_model/ ({"pixels"} ->
                     {"probabilities"}), predictions.npz, metrics.json (name, members), DONE
  baseline/          --baseline: BAN-1's architecture and seed on labels only; as gen_k/
  tb/<row name>/     TensorBoard, one run per row (Teacher, BAN-k, BANE-k, Baseline): train/*,
                     val/* (step = epoch), test/accuracy, test/error (step = epochs), an
                     hparams session (report.py); tb/generations/, tb/ensembles/, tb/baseline/:
                     the rows as series over the generation index, and the table as text
  results.json       every row (generations.collect_results: from the finished models'
                     metrics.json) with its paired comparison "vs_teacher"/"vs_baseline"
                     (delta, ci95, p, n, method, verdict: stats.py), the split sizes
                     ("data") and epochs
  results.md         the same as a table (also printed at the end of a run)
  report.png         report.py's figure
  seed_S/            --seeds: one run directory per base seed; the parent holds
                     config.json, results.json (mean and std), results.md, report.png

A model is finished when its DONE marker exists and the manifest records it (a run
directory written before manifests: DONE alone, until it is opened and the finished
models are recorded). Sealing writes, in this order: the SavedModel (exported, or
copied), its assets and model.keras; then (optionally) figures measured through that
copy; the per-example outputs; metrics.json; the manifest entry; DONE. A process killed anywhere in between
leaves a model that is not finished, and a rerun redoes it.
"""

import fcntl
import glob
import os
import re
import shutil
import socket

from absl import logging
import tensorflow as tf
from tensorflow.core.util import event_pb2

from ban_tf import errors
from ban_tf import export
from ban_tf import layout
from ban_tf import manifest
from ban_tf import predictions
from ban_tf import pretrained
from ban_tf import results as results_lib

LOCK_FILE = layout.LOCK
_TASK = object()  # seal(stateful=...): ask the task for the model's stateful view


class ModelDir:
  """One model's directory (gen_k/, ensemble_k/, baseline/): its files and how it is sealed.

  Attributes:
    name: the directory's name, also its manifest entry (gen_k, ensemble_k, baseline).
    row: its row and TensorBoard run name (Teacher, BAN-k, BANE-k, Baseline).
    path: where this process writes it; `read`: where it is read from (the same,
      except on a multi-worker non-chief, which writes a private copy: cluster.py).
    run_path, read_run_path: the run directories holding them (and manifest.json).
  """

  def __init__(self, run_path, name, row, read_run_path=None, identity=None):
    self.run_path, self.name, self.row = run_path, name, row
    # (key, value) its metrics.json holds (("gen", 2), ("name", "BANE-2")): what a copy of
    # another model's directory betrays itself by.
    self.identity = identity
    self.read_run_path = read_run_path or run_path
    self.path = os.path.join(run_path, name)
    self.read = os.path.join(self.read_run_path, name)
    self._writer = None

  @classmethod
  def at(cls, path, read=None, row=None):
    """The handle of the model directory `path` (and its read side `read`), wherever it is."""
    run_path, name = os.path.split(os.path.abspath(path))
    read_run = os.path.dirname(os.path.abspath(read)) if read else run_path
    return cls(run_path, name, row or name, read_run)

  def __repr__(self):
    return f"ModelDir({self.path!r})"

  # ---- names ----------------------------------------------------------------------
  @property
  def saved_model(self):
    """The SavedModel this process writes."""
    return os.path.join(self.path, layout.SAVED_MODEL)

  @property
  def read_saved_model(self):
    """The SavedModel to read (a teacher, an ensemble member, evaluate)."""
    return os.path.join(self.read, layout.SAVED_MODEL)

  @property
  def read_keras(self):
    return os.path.join(self.read, layout.KERAS)

  @property
  def metrics_path(self):
    return os.path.join(self.read, layout.METRICS)

  @property
  def history_path(self):
    return os.path.join(self.read, layout.HISTORY)

  @property
  def tensorboard_dir(self):
    """run_path/tb/<row name>: TensorBoard names its runs tb/Teacher, tb/BAN-1, ..."""
    return tensorboard_dir(self.run_path, self.row)

  def make(self):
    """Creates the model directory; raises errors.RunDirError when a directory holds the place
    of its per-example outputs file (predictions.check_path), before a model is trained."""
    os.makedirs(self.path, exist_ok=True)
    predictions.check_path(self.path)

  # ---- reading --------------------------------------------------------------------
  @property
  def is_done(self):
    """Its DONE marker exists (read side)."""
    return os.path.exists(os.path.join(self.read, layout.DONE))

  @property
  def is_finished(self):
    """DONE, and recorded in the run's manifest (or the run has no manifest: written before them)."""
    if not self.is_done:
      return False
    entries = manifest.read(self.read_run_path)
    return self.name in entries or not os.path.exists(manifest.path(self.read_run_path))

  @property
  def has_saved_model(self):
    return os.path.isdir(self.read_saved_model)

  def read_metrics(self, fix=None):
    """Its metrics.json (a JSON object).

    Raises:
      errors.RunDirError: missing or damaged (one line, then `fix`; default: retrain it).
    """
    fix = fix or (
      f"restore it, or delete {self.name}/ (and every later generation and ensemble) to "
      "retrain it, or --overwrite"
    )
    return export.read_json_checked(self.metrics_path, fix)

  def metrics_or_why(self):
    """(metrics dict, None), or (None, why it cannot be read)."""
    try:
      return self.read_metrics("restore it, or delete its directory to retrain it"), None
    except errors.UsageError as e:
      return None, str(e)

  def read_history(self, fix):
    """Its history.json: a list of per-epoch dicts with an int `epoch`, or [] when there is none.

    Raises:
      errors.RunDirError: damaged (one line, then `fix`).
    """
    if not os.path.exists(self.history_path):
      return []
    entries = export.read_json_checked(self.history_path, fix, expect=list)
    if not all(isinstance(h, dict) and isinstance(h.get("epoch"), int) for h in entries):
      raise errors.RunDirError(f"{self.history_path} is damaged (entries without an epoch): {fix}")
    return entries

  def check(self, keras=False):
    """Its SavedModel fingerprint (and, with `keras`, its model.keras) must hash to the run's
    manifest; returns whether the manifest records it (manifest.check)."""
    return manifest.check(self.read_run_path, self.name, self.read, saved_model=True, keras=keras)

  # ---- training: history, TensorBoard, checkpoints --------------------------------
  def write_history(self, entries):
    export.write_json(entries, os.path.join(self.path, layout.HISTORY))

  def summary_writer(self):
    """The model's TensorBoard writer (one per handle: epochs and the final test scalars)."""
    if self._writer is None:
      self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
    return self._writer

  def checkpoint_manager(self, checkpoint):
    """Where epoch checkpoints go: the last two are kept."""
    return tf.train.CheckpointManager(
      checkpoint, os.path.join(self.path, layout.CKPT), max_to_keep=2
    )

  def _retrain_fix(self):
    return (
      f"delete {self.read}/{layout.CKPT} and {self.history_path} to retrain this generation "
      "from epoch 0, or --overwrite"
    )

  def restore(self, checkpoint, label):
    """Restores the newest readable checkpoint into `checkpoint`; returns its prefix (None: none).

    A newest checkpoint that is missing (its index entry dangling) or unreadable
    (truncated, emptied) is skipped with a warning and the previous one is used;
    where this process owns the directory, the damaged files are removed and the
    index is rewritten to the checkpoint used, so the next save and every later
    rerun see a consistent directory. `label` starts the warnings ("gen 1").

    Raises:
      errors.RunDirError: checkpoints exist but none is readable.
    """
    ckpt_dir = os.path.join(self.read, layout.CKPT)
    candidates, bad_index = _checkpoints(ckpt_dir) if os.path.isdir(ckpt_dir) else ([], False)
    if not candidates:
      return None
    latest, skipped = None, []
    for prefix in candidates:
      name = f"{self.name}/{layout.CKPT}/{os.path.basename(prefix)}"
      if not os.path.exists(prefix + ".index"):
        skipped.append((prefix, f"{name} is missing (its index entry is dangling)"))
        continue
      try:
        checkpoint.restore(prefix).assert_existing_objects_matched()
      except Exception as e:  # pylint: disable=broad-except  (DataLossError, NotFoundError, AssertionError, ...)
        skipped.append((prefix, f"{name} is unreadable ({type(e).__name__})"))
        continue
      latest = prefix
      break
    if latest is None:
      raise errors.RunDirError(
        f"{ckpt_dir} holds no readable checkpoint ("
        + "; ".join(why for _, why in skipped)
        + f"): {self._retrain_fix()}"
      )
    for _prefix, why in skipped:
      logging.warning(
        "%s: %s: resuming from the previous checkpoint, %s", label, why, os.path.basename(latest)
      )
    if (skipped or bad_index) and self.read == self.path:
      # Repair: drop the damaged files, point the index at `latest`.
      for prefix, _ in skipped:
        for path in glob.glob(prefix + ".index") + glob.glob(prefix + ".data-*"):
          os.remove(path)
      kept = [p for p in candidates if p not in {q for q, _ in skipped}]
      tf.compat.v1.train.update_checkpoint_state(
        ckpt_dir,
        os.path.basename(latest),
        all_model_checkpoint_paths=[os.path.basename(p) for p in reversed(kept)],
      )
    return latest

  def history(self, epochs):
    """The per-epoch entries of epochs 1..`epochs` (those a restored checkpoint holds).

    Entries after `epochs` (written before a checkpoint that was never saved) are
    dropped. history.json is written before each checkpoint, so it covers every
    checkpointed epoch; when it does not (deleted, or cut short by hand), resuming
    would silently lose those epochs' rows and refuses instead.

    Raises:
      errors.RunDirError: history.json is damaged, or lacks a checkpointed epoch.
    """
    fix = self._retrain_fix()
    entries = [h for h in self.read_history(f"restore it, or {fix}") if h["epoch"] <= epochs]
    missing = sorted(set(range(1, epochs + 1)) - {h["epoch"] for h in entries})
    if missing:
      what = (
        "is missing"
        if not os.path.exists(self.history_path)
        else "lacks epochs " + (", ".join(str(e) for e in missing))
      )
      raise errors.RunDirError(
        f"{self.history_path} {what} but {self.name}/{layout.CKPT} holds epochs 1..{epochs}: "
        f"restore it, or {fix}"
      )
    return entries

  def truncate_tensorboard(self, last_epoch):
    """Cuts the model's TensorBoard events back to its checkpointed epochs (truncate_tensorboard)."""
    truncate_tensorboard(self.tensorboard_dir, last_epoch)

  # ---- sealing --------------------------------------------------------------------
  def seal(
    self,
    task,
    spec,
    result,
    *,
    model=None,
    output_name=export.LOGITS,
    stateful=_TASK,
    keras_model=None,
    copy_from=None,
    measure=None,
    summary_step=None,
    record=None,
    extra_files=(),
    outputs=None,
  ):
    """Writes a finished model, in the one order every model is sealed; returns `result`.

    1. The model: `model` exported as a fingerprinted SavedModel serving `output_name`
       (export.LOGITS, or export.PROBABILITIES for an ensemble) with `stateful` as
       `serve_stateful` (default: task.stateful_model(model); None: none); or
       `copy_from`, a ban_tf SavedModel copied as it is (every endpoint) with the
       model.keras beside it. labels.txt of spec.class_names; the task's assets
       (spec.assets) beside it; `keras_model` (task.stock_model of it) as model.keras.
    2. `measure(saved_model_path)`: figures measured through the written copy (an
       imported teacher), added to `result`.
    3. task.summarize(result) added to `result`; with `summary_step`, the final test
       scalars (test/accuracy, test/error, {split}/final_<derived>) in the model's
       TensorBoard run at that step.
    4. `extra_files`: (file name, write(path)) pairs, each written atomically into the
       model directory and its sha256 recorded in the manifest entry (`files_sha256`);
       `outputs(model_dir)`: writes the per-example outputs (layout.PREDICTIONS,
       predictions.py) through the written SavedModel (task.store_predictions, called with
       `loaded=` the export's tf.saved_model.load of it, or None); its sha256
       is recorded in the entry as `predictions_sha256` (manifest.digests).
    5. metrics.json (`result`); 6. the manifest entry: the digests, `record` and the
       extra files'; 7. DONE; then the training checkpoints are removed.
    """
    assert (model is None) != (copy_from is None), "seal: a model or copy_from"
    self.make()
    loaded = None  # the written SavedModel, loaded (the export's), for `outputs`
    if copy_from is not None:
      _copy_tree(copy_from, self.saved_model)
      keras_path = layout.beside(copy_from, layout.KERAS)
      if os.path.exists(keras_path):
        _copy_file(keras_path, os.path.join(self.path, layout.KERAS))
      if spec.class_names:  # this data set's names (the source's run may have had others)
        export.write_text(
          "".join(f"{n}\n" for n in spec.class_names),
          os.path.join(self.saved_model, export.LABELS_FILE),
        )
    else:
      _, loaded = export.export_saved_model(
        model,
        self.saved_model,
        spec.input_shape,
        class_names=spec.class_names,
        output_name=output_name,
        spec=spec,
        stateful=task.stateful_model(model) if stateful is _TASK else stateful,
        return_loaded=True,
      )
    for name, text in spec.assets:  # inside the SavedModel, as an image model's labels.txt
      export.write_text(text, os.path.join(self.saved_model, name))
    if keras_model is not None:
      export.save_keras(task.stock_model(keras_model), os.path.join(self.path, layout.KERAS))
    if measure is not None:
      result.update(measure(self.saved_model))
    derived = task.summarize(result)
    result.update(derived)
    if summary_step is not None:
      writer = self.summary_writer()
      with writer.as_default(step=summary_step):
        tf.summary.scalar("test/accuracy", result["test_accuracy"])
        tf.summary.scalar("test/error", result["test_error"])
        for key in derived:
          split, name = key.split("_", 1)
          tf.summary.scalar(f"{split}/final_{name}", result[key])
      writer.flush()
    files = {}
    for name, write in extra_files:
      path = os.path.join(self.path, name)
      tmp = export._tmp_path(path)  # pylint: disable=protected-access
      write(tmp)
      os.replace(tmp, path)
      files[name] = manifest.file_digest(path)
    if outputs is not None:
      outputs(self.path, loaded=loaded)
    export.write_json(result, os.path.join(self.path, layout.METRICS))
    # Bound to the run outside the model directory, before DONE (manifest.py).
    fields = dict(record or {}, **manifest.digests(self.path))
    if files:
      fields["files_sha256"] = files
    manifest.record(self.run_path, self.name, **fields)
    export.touch_done(self.path)
    shutil.rmtree(os.path.join(self.path, layout.CKPT), ignore_errors=True)
    return result


class RunFiles:
  """A run directory as it lies on disk, read without a lock (evaluate, report, the results).

  `path`: where this process writes; `read_path`: where finished models are read from
  (the same, except on a multi-worker non-chief: cluster.py).
  """

  def __init__(self, path, read_path=None):
    self.path = path
    self.read_path = read_path or path

  def generation(self, k):
    """gen_k/ (k = 0: the teacher), or with k = "baseline" the baseline."""
    if k == layout.BASELINE:
      return self.baseline()
    return ModelDir(
      self.path,
      layout.numbered(layout.GEN, k),
      results_lib.generation_name(k),
      self.read_path,
      identity=("gen", k),
    )

  def ensemble(self, k):
    name = f"BANE-{k}"
    return ModelDir(
      self.path, layout.numbered(layout.ENSEMBLE, k), name, self.read_path, identity=("name", name)
    )

  def baseline(self):
    return ModelDir(
      self.path,
      layout.BASELINE,
      results_lib.generation_name(layout.BASELINE),
      self.read_path,
      identity=("gen", layout.BASELINE),
    )

  def seed_run(self, seed):
    """The run directory of base seed `seed` under a --seeds parent."""
    return os.path.join(self.path, layout.numbered(layout.SEED, seed))

  def seed_runs(self):
    """Names of the seed_S/ run directories (with a config.json) under this one."""
    return sorted(
      d
      for d in (os.listdir(self.read_path) if os.path.isdir(self.read_path) else [])
      if layout.number_of(d, layout.SEED) is not None
      and os.path.exists(os.path.join(self.read_path, d, layout.CONFIG))
    )

  @property
  def config_path(self):
    return os.path.join(self.read_path, layout.CONFIG)

  @property
  def results_path(self):
    """results.json (read side)."""
    return os.path.join(self.read_path, layout.RESULTS_JSON)

  @property
  def results_md_path(self):
    return os.path.join(self.path, layout.RESULTS_MD)

  def write_results(self, results, text=None):
    """results.json (`results`) and, with `text`, results.md, atomically."""
    export.write_json(results, os.path.join(self.path, layout.RESULTS_JSON))
    if text is not None:
      export.write_text(text, self.results_md_path)

  def numbered(self, prefix, done=False):
    """Sorted k of the {prefix}_k directories (with a DONE marker if `done`)."""
    out = []
    if not os.path.isdir(self.read_path):
      return out
    for name in os.listdir(self.read_path):
      k = layout.number_of(name, prefix)
      if k is not None and (
        not done or os.path.exists(os.path.join(self.read_path, name, layout.DONE))
      ):
        out.append(k)
    return sorted(out)

  def finished_gens(self):
    """Generation numbers that are finished (DONE and recorded), in order (any --gens)."""
    return [k for k in self.numbered(layout.GEN, done=True) if self.generation(k).is_finished]

  def finished_ensembles(self):
    return [k for k in self.numbered(layout.ENSEMBLE, done=True) if self.ensemble(k).is_finished]

  def exported(self, prefix):
    """[(k, ModelDir)] of the {prefix}_k directories that hold a SavedModel or are DONE
    (evaluate: a finished one whose SavedModel is gone is reported, not skipped)."""
    handle = self.generation if prefix == layout.GEN else self.ensemble
    return [
      (k, handle(k))
      for k in self.numbered(prefix)
      if handle(k).has_saved_model or handle(k).is_done
    ]


class RunDir(RunFiles):
  """Holds an exclusive lock on a run directory for the life of the process.

  The lock is an fcntl lock, released by the kernel when the process dies, so a
  killed run never leaves a stuck lock.
  """

  def __init__(self, path, cfg, spec=None, read_path=None):
    """`spec`: the tasks.DataSpec finished generations' outputs must fit (None: not checked)."""
    super().__init__(path, read_path)
    self._lock = None
    self.cfg = cfg
    self.spec = spec
    # Finished (DONE) ensembles found damaged on open: rebuilt from their members.
    self.stale_ensembles = set()

  def open(self):
    """Creates/locks the directory, checks it, then writes config.json.

    Every check (lock, experiment flags, finished generations' SavedModels) runs
    before anything but the lock file is written, so a refused run changes nothing.
    """
    try:  # config.check_paths cannot foresee every refusal (root under /proc, a full disk, NFS)
      os.makedirs(self.path, exist_ok=True)
      fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise errors.RunDirError(
        f"{self.path} cannot be created or written ({e.strerror or type(e).__name__}): "
        "pass another --run_dir, or free space there"
      ) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise errors.RunDirError(
        f"{self.path} is in use by {holder}: wait for it, stop it, or pass another --run_dir"
      ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    self._lock = fd
    try:
      self._check_and_write_config()
    except BaseException:
      self.close()
      raise
    return self

  def _check_and_write_config(self):
    cfg_path = os.path.join(self.path, layout.CONFIG)
    if self.cfg.overwrite:
      for name in os.listdir(self.path):
        if name != LOCK_FILE:
          target = os.path.join(self.path, name)
          shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    elif os.path.exists(cfg_path):
      stored = export.read_json_checked(
        cfg_path,
        "restore it, or pass --overwrite to start over (deletes the run), or another --run_dir",
      )
      diff = self.cfg.experiment_diff(stored)
      if diff:
        raise errors.RunDirError(
          f"{self.path} holds a different experiment (differs in {', '.join(diff)}): "
          "rerun with the original flags to resume, pass another --run_dir, or --overwrite to start over"
        )
    for name in export.remove_stale_tmp(self.path):
      logging.info("removed %s, left by a killed process", name)
    adopt = self.verify_finished()
    for name, entry in adopt.items():  # only once every check passed: a refused run writes nothing
      logging.warning(
        "%s: no entry in %s (written before manifests): recorded from its own fingerprint",
        name,
        manifest.path(self.path),
      )
      manifest.record(self.path, name, **entry)
    export.write_json(self.cfg.to_dict(), cfg_path)

  def verify_finished(self):
    """Re-verifies every finished (DONE) generation before it is used; returns the
    manifest entries to record for finished artefacts the manifest does not know.

    Per generation: metrics.json is a readable JSON object; the SavedModel loads
    and reproduces its fingerprint, its outputs fit the data set, and its
    fingerprint and model.keras hash to the run's manifest (manifest.py). A failed
    check raises errors.UsageError naming the file and the fix. Finished
    ensembles that fail theirs are only marked stale (rebuilt from their members).

    The manifest is the truth of what is finished. A DONE directory it does not
    record is adopted (recorded from its own fingerprint) only when it is a run
    directory's own model written before manifests: not when it is a copy of
    another of the run's models (its fingerprint or its metrics.json says so). Such
    a copy is refused where this run would use it, and left out (no row) beyond --gens.
    """
    adopt = {}
    manifest.read(self.read_path)  # a damaged manifest is refused before anything else
    for gen in self.numbered(layout.GEN, done=True):
      g = self.generation(gen)
      if gen > self.cfg.gens:  # kept as is (a smaller --gens); not used by this run
        self._adopt_unused(g, adopt)
        continue
      g.read_metrics()
      if gen == 0 and getattr(
        self.cfg, "teacher", None
      ):  # --teacher: not replaced since it was imported
        pretrained.check_source(self.cfg, g.read)
      out = export.verify_saved_model(g.read_saved_model)
      if self.spec is not None and not self.spec.matches_outputs(out.shape):
        want = tuple("T" if d is None else d for d in self.spec.output_shape)
        raise errors.TeacherError(
          f"{g.read_saved_model} outputs shape {tuple(out.shape[1:])} per example but this data set has "
          f"{self.spec.num_outputs} {self.spec.output_unit} (outputs {want}): use a teacher trained on "
          "the same data set, or --overwrite"
        )
      if not g.check(keras=True):
        copy = self._copy_of(g, adopt)
        if copy:
          raise errors.RunDirError(
            f"{g.read} is marked DONE but this run never recorded it in "
            f"{manifest.path(self.read_path)} ({copy}): delete {g.name}/ (and every later "
            "generation and ensemble) to retrain it, or --overwrite"
          )
        adopt[g.name] = manifest.digests(g.read)
    for k in self.numbered(layout.ENSEMBLE, done=True):
      e = self.ensemble(k)
      if k > self.cfg.gens:
        self._adopt_unused(e, adopt)
        continue
      try:
        e.read_metrics("rebuilt")
        export.verify_saved_model(e.read_saved_model)
        known = e.check()
        copy = None if known else self._copy_of(e, adopt)
        if copy:
          raise errors.TeacherError(f"{e.read} is not recorded in the manifest ({copy})")
      except errors.UsageError as err:
        logging.warning("%s: rebuilding BANE-%d from its members", err, k)
        self.stale_ensembles.add(k)
        continue
      if not known:
        adopt[e.name] = manifest.digests(e.read, keras=False)
    if self.baseline().is_done:
      self._adopt_unused(self.baseline(), adopt)
    return adopt

  def _copy_of(self, model, adopt):
    """Why an unrecorded DONE `model` is a copy of another of the run's models, or None."""
    metrics, _ = model.metrics_or_why()
    if metrics is not None and model.identity is not None:
      key, want = model.identity
      if metrics.get(key, want) != want:
        return f"its {layout.METRICS} is that of {key} {metrics[key]!r}"
    try:
      digest = manifest.digests(model.read, keras=False)["fingerprint_sha256"]
    except errors.UsageError:
      return None
    known = dict(manifest.read(self.read_path), **adopt)
    for name, entry in known.items():
      if name != model.name and entry.get("fingerprint_sha256") == digest:
        return f"its SavedModel is {name}'s"
    return None

  def _adopt_unused(self, model, adopt):
    """A DONE model this run does not verify (beyond --gens, the baseline): recorded when
    the manifest lacks it and it is the run's own, so that it stays finished (and keeps its row)."""
    if model.name in manifest.read(self.read_path):
      return
    copy = self._copy_of(model, adopt)
    if copy:
      logging.warning(
        "%s is marked DONE but not recorded in %s (%s): left out of this run's results",
        model.read,
        manifest.path(self.read_path),
        copy,
      )
      return
    try:
      adopt[model.name] = manifest.digests(model.read)
    except errors.UsageError as e:
      logging.warning("%s: not recorded, left out of this run's results", e)

  def check_member(self, gen, keras=False):
    """Before gen_{gen} is used (teacher, ensemble member): its SavedModel fingerprint
    (and, with `keras`, its model.keras) must hash to the run's manifest."""
    self.generation(gen).check(keras=keras)

  def close(self):
    if self._lock is not None:
      fcntl.flock(self._lock, fcntl.LOCK_UN)
      os.close(self._lock)
      self._lock = None

  def __enter__(self):
    return self.open()

  def __exit__(self, *exc):
    self.close()


def tensorboard_dir(run_path, row):
  """The TensorBoard run of one row (generation, ensemble, baseline): run_path/tb/<row name>."""
  return os.path.join(run_path, layout.TENSORBOARD, row)


def _copy_tree(src, dst):
  """Copies directory `src` to `dst` atomically (a temporary sibling, then a rename)."""
  tmp = export._tmp_path(dst)  # pylint: disable=protected-access
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp)
  export._replace_dir(tmp, dst)  # pylint: disable=protected-access


def _copy_file(src, dst):
  tmp = export._tmp_path(dst)  # pylint: disable=protected-access
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)


def _ckpt_number(prefix):
  m = re.search(r"-(\d+)$", prefix)
  return int(m.group(1)) if m else -1


def _checkpoints(ckpt_dir):
  """(checkpoint prefixes in `ckpt_dir`, newest first; whether its index is damaged).

  The prefixes: those the `checkpoint` index names (even when their files are gone)
  and every ckpt-N.index file (even when the index is damaged or lost track of it).
  """
  found, damaged = set(), False
  try:
    state = tf.train.get_checkpoint_state(ckpt_dir)
    why = "unparsable" if state is None else ""
  except Exception as e:  # pylint: disable=broad-except  (a damaged index: text-proto parse errors)
    state, why = None, type(e).__name__
  if state is None and os.path.exists(os.path.join(ckpt_dir, "checkpoint")):
    logging.warning(
      "%s/checkpoint is damaged (%s): using the checkpoint files it should list",
      os.path.join(os.path.basename(os.path.dirname(ckpt_dir)), layout.CKPT),
      why,
    )
    damaged = True
  if state is not None:
    for p in list(state.all_model_checkpoint_paths) + [state.model_checkpoint_path]:
      if p:
        found.add(os.path.join(ckpt_dir, os.path.basename(p)))
  for index in glob.glob(os.path.join(ckpt_dir, "ckpt-*.index")):
    found.add(index[: -len(".index")])
  return sorted(found, key=_ckpt_number, reverse=True), damaged


def truncate_tensorboard(logdir, last_epoch):
  """Cuts a model's TensorBoard events back to the checkpointed epochs (step <= last_epoch).

  Epoch e's scalars are written before its checkpoint; a run stopped in between
  (disk full, a kill) would write them again when it resumes, leaving two points
  per (tag, step); likewise test/*, written after the last epoch but before the
  generation is DONE. TensorBoard only purges such orphans for TF1's session-log
  events, so the events files are rewritten here (atomically, one file) keeping
  every record whose step is <= last_epoch, test/* left out. Hparams files
  (report.py) are left alone.
  """
  files = sorted(
    f
    for f in tf.io.gfile.glob(os.path.join(logdir, "events.out.tfevents.*"))
    if not f.endswith(".hparams")
  )
  if not files:
    return
  kept, dropped = [], 0
  for path in files:
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      # test/* is written once, after the last epoch (seal): a rerun that gets there writes it again.
      if event.HasField("summary") and (
        event.step > last_epoch or any(v.tag.startswith("test/") for v in event.summary.value)
      ):
        dropped += 1
      else:
        kept.append(record.numpy())
  if not dropped:
    return
  out = os.path.join(logdir, os.path.basename(files[-1]) + ".resumed")
  tmp = out + ".tmp"
  with tf.io.TFRecordWriter(tmp) as w:
    for record in kept:
      w.write(record)
  for path in files:
    os.remove(path)
  os.replace(tmp, out)
  logging.info(
    "%s: dropped %d TensorBoard points after epoch %d (written before a checkpoint that "
    "was never saved)",
    logdir,
    dropped,
    last_epoch,
  )
