"""The run directory: one process at a time, one experiment per directory.

Layout (README "Run directory"):
  config.json                 resolved config (checked on resume)
  manifest.json               digests of every finished artefact (manifest.py)
  gen_k/{saved_model/, model.keras, metrics.json, history.json, DONE}
  tb/<row name>/              TensorBoard: Teacher, BAN-k, BANE-k, Baseline (results.tensorboard_dir)
  ensemble_k/{saved_model/, metrics.json, DONE}
  results.json, results.md
"""

import fcntl
import os
import shutil
import socket

from absl import logging

from ban_tf import errors
from ban_tf import export
from ban_tf import manifest
from ban_tf import pretrained

LOCK_FILE = ".lock"


class RunDir:
  """Holds an exclusive lock on a run directory for the life of the process.

  The lock is an fcntl lock, released by the kernel when the process dies, so a
  killed run never leaves a stuck lock.
  """

  def __init__(self, path, cfg, spec=None, read_path=None):
    """`spec`: the tasks.DataSpec finished generations' outputs must fit (None: not checked)."""
    self.path = path
    self._lock = None
    self.cfg = cfg
    self.spec = spec
    # Where finished generations, teachers and checkpoints are read from: `path`,
    # except on a multi-worker non-chief, which writes a private copy (cluster.py).
    self.read_path = read_path or path
    # Finished (DONE) ensembles found damaged on open: rebuilt from their members.
    self.stale_ensembles = set()

  def gen_dir(self, gen):
    return os.path.join(self.path, f"gen_{gen}")

  def ensemble_dir(self, k):
    return os.path.join(self.path, f"ensemble_{k}")

  def read_gen_dir(self, gen):
    return os.path.join(self.read_path, f"gen_{gen}")

  def read_ensemble_dir(self, k):
    return os.path.join(self.read_path, f"ensemble_{k}")

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
    cfg_path = os.path.join(self.path, "config.json")
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

  def finished_gens(self):
    """Generation numbers with a DONE marker, in order (any --gens: a smaller one keeps them)."""
    return _numbered(self.read_path, "gen", done=True)

  def finished_ensembles(self):
    return _numbered(self.read_path, "ensemble", done=True)

  def verify_finished(self):
    """Re-verifies every finished (DONE) generation before it is used; returns the
    manifest entries to record for finished artefacts the manifest does not know.

    Per generation: metrics.json is a readable JSON object; the SavedModel loads
    and reproduces its fingerprint, its outputs fit the data set, and its
    fingerprint and model.keras hash to the run's manifest (manifest.py). A failed
    check raises errors.UsageError naming the file and the fix. Finished
    ensembles that fail theirs are only marked stale (rebuilt from their members).
    """
    adopt = {}
    manifest.read(self.read_path)  # a damaged manifest is refused before anything else
    for gen in self.finished_gens():
      if gen > self.cfg.gens:
        continue  # kept as is (a smaller --gens); not used by this run
      name, gdir = f"gen_{gen}", self.read_gen_dir(gen)
      export.read_json_checked(
        os.path.join(gdir, "metrics.json"),
        f"restore it, or delete {name}/ (and every later generation and ensemble) to retrain it, or --overwrite",
      )
      path = os.path.join(gdir, "saved_model")
      if gen == 0 and getattr(
        self.cfg, "teacher", None
      ):  # --teacher: not replaced since it was imported
        pretrained.check_source(self.cfg, gdir)
      out = export.verify_saved_model(path)
      if self.spec is not None and not self.spec.matches_outputs(out.shape):
        want = tuple("T" if d is None else d for d in self.spec.output_shape)
        raise errors.TeacherError(
          f"{path} outputs shape {tuple(out.shape[1:])} per example but this data set has "
          f"{self.spec.num_outputs} {self.spec.output_unit} (outputs {want}): use a teacher trained on "
          "the same data set, or --overwrite"
        )
      if not manifest.check(self.read_path, name, gdir, saved_model=True, keras=True):
        adopt[name] = manifest.digests(gdir)
    for k in self.finished_ensembles():
      name, edir = f"ensemble_{k}", self.read_ensemble_dir(k)
      if k > self.cfg.gens:
        continue
      try:
        export.read_json_checked(os.path.join(edir, "metrics.json"), "rebuilt")
        export.verify_saved_model(os.path.join(edir, "saved_model"))
        known = manifest.check(self.read_path, name, edir, saved_model=True)
      except errors.UsageError as e:
        logging.warning("%s: rebuilding BANE-%d from its members", e, k)
        self.stale_ensembles.add(k)
        continue
      if not known:
        adopt[name] = manifest.digests(edir, keras=False)
    return adopt

  def check_member(self, gen, keras=False):
    """Before gen_{gen} is used (teacher, ensemble member): its SavedModel fingerprint
    (and, with `keras`, its model.keras) must hash to the run's manifest."""
    manifest.check(
      self.read_path, f"gen_{gen}", self.read_gen_dir(gen), saved_model=True, keras=keras
    )

  def close(self):
    if self._lock is not None:
      fcntl.flock(self._lock, fcntl.LOCK_UN)
      os.close(self._lock)
      self._lock = None

  def __enter__(self):
    return self.open()

  def __exit__(self, *exc):
    self.close()


def _numbered(root, prefix, done=False):
  """Sorted k of root/{prefix}_k directories (with a DONE marker if `done`)."""
  out = []
  if not os.path.isdir(root):
    return out
  for name in os.listdir(root):
    head, _, k = name.partition("_")
    if head == prefix and k.isdigit() and (not done or export.is_done(os.path.join(root, name))):
      out.append(int(k))
  return sorted(out)
