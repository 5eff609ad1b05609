"""The run manifest: what each finished artefact of a run must hash to, kept outside the artefacts.

A generation directory carries its own fingerprint (export.FINGERPRINT_FILE), so a
SavedModel copied from another generation or run verifies against itself. The
manifest binds every finished artefact to *this* run: `run_dir/manifest.json`
holds, per artefact name (gen_k, ensemble_k, baseline), the digests recorded when
it was written, and a finished artefact is trusted as a teacher or an ensemble
member only when it still hashes to them (rundir.RunDir.verify_finished, and
generations.py before each use).

  {"version": 1, "entries": {"gen_0": {"fingerprint_sha256": ..., "keras_sha256": ...,
                                        "weights_sha256": ...}, "ensemble_2": {...}}}

Entry fields (all optional; a check only compares the fields an entry has):
  fingerprint_sha256: sha256 of the SavedModel's fingerprint outputs
    (`fingerprint_digest`), i.e. of what the model computes, not of its files.
  keras_sha256: sha256 of the model.keras file's bytes (`file_digest`).
  weights_sha256: `weights_digest` of the trained student (also in metrics.json).
  files_sha256: {file name: sha256} of the extra files sealed with the model
    (rundir.ModelDir.seal's `extra_files`).
  predictions_sha256: sha256 of the per-example outputs file's bytes (predictions.py).
Other entries may record anything else a run depends on, e.g. an external teacher
SavedModel (`record(run_dir, "teacher", source=path, fingerprint_sha256=...)`).

Standard library at import time (NumPy when a fingerprint is hashed). Written by one process at a time (the holder of
the run directory's lock), atomically (temporary file, fsync, rename).
"""

import hashlib
import json
import os

import numpy as np

from ban_tf import errors
from ban_tf import layout

FILE = layout.MANIFEST
VERSION = 1
FINGERPRINT_FILE = "fingerprint.npz"  # export.FINGERPRINT_FILE (export imports TensorFlow)
PREDICTIONS_FILE = layout.PREDICTIONS


def path(run_dir):
  return os.path.join(run_dir, FILE)


def read(run_dir):
  """{artefact name: entry} of `run_dir`'s manifest; {} when it has none.

  Raises:
    errors.RunDirError: the manifest exists but is not a readable manifest.
  """
  p = path(run_dir)
  if not os.path.exists(p):
    return {}
  try:
    with open(p, encoding="utf-8") as f:
      data = json.load(f)
    entries = data["entries"]
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
      raise ValueError("entries is not a mapping of objects")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.RunDirError(
      f"{p} is damaged ({_why(e)}): restore it, or delete it to re-record the finished generations "
      "from their own fingerprints, or --overwrite to start over"
    ) from None
  return entries


def record(run_dir, name, **fields):
  """Sets (replaces) the entry `name` of `run_dir`'s manifest to `fields`."""
  entries = read(run_dir)
  entries[name] = dict(fields)
  p = path(run_dir)
  tmp = os.path.join(run_dir, f".tmp-{os.getpid()}-{FILE}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"version": VERSION, "entries": entries}, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def file_digest(file_path):
  """sha256 (hex) of a file's bytes."""
  h = hashlib.sha256()
  with open(file_path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def fingerprint_digest(saved_model):
  """sha256 (hex) of the fingerprint outputs stored in a SavedModel directory.

  Raises:
    errors.TeacherError: no readable fingerprint.
  """
  fp = os.path.join(saved_model, FINGERPRINT_FILE)
  try:
    with np.load(fp) as data:
      out = np.ascontiguousarray(data["outputs"])
  except Exception as e:  # pylint: disable=broad-except  (missing, truncated, not an npz)
    raise errors.TeacherError(
      f"{fp} is missing or damaged ({_why(e)}): delete its generation directory to retrain it, "
      "or --overwrite"
    ) from None
  h = hashlib.sha256(str((out.dtype.str, out.shape)).encode())
  h.update(out.tobytes())
  return h.hexdigest()


def weights_digest(model):
  """sha256 (hex) of every weight of a Keras model (trainable and BatchNorm statistics), in layer order."""
  h = hashlib.sha256()
  for w in model.get_weights():
    h.update(np.ascontiguousarray(w).tobytes())
  return h.hexdigest()


def digests(gen_dir, keras=True):
  """The digests of a finished generation (or ensemble) directory, as an entry records them."""
  out = {"fingerprint_sha256": fingerprint_digest(os.path.join(gen_dir, layout.SAVED_MODEL))}
  keras_path = os.path.join(gen_dir, layout.KERAS)
  if keras and os.path.exists(keras_path):
    out["keras_sha256"] = file_digest(keras_path)
  pred = os.path.join(gen_dir, PREDICTIONS_FILE)
  if os.path.exists(pred):
    out["predictions_sha256"] = file_digest(pred)
  return out


def add_predictions(run_dir, name, gen_dir):
  """Records gen_dir's predictions file in the entry `name` (outputs computed after the run
  finished: `python -m ban_tf.report` / `ban_tf.evaluate` on a run made before they were
  stored). Nothing is recorded when the manifest has no such entry."""
  entries = read(run_dir)
  if name in entries:
    # Replaces the digest an entry may already hold (its file was damaged, deleted, recomputed).
    fields = dict(
      entries[name], predictions_sha256=file_digest(os.path.join(gen_dir, PREDICTIONS_FILE))
    )
    record(run_dir, name, **fields)


def check_predictions(run_dir, name, gen_dir):
  """Raises errors.UsageError unless gen_dir's predictions file hashes to the manifest's entry
  (when the entry records one)."""
  entry = read(run_dir).get(name) or {}
  pred = os.path.join(gen_dir, PREDICTIONS_FILE)
  if "predictions_sha256" in entry and os.path.exists(pred):
    if file_digest(pred) != entry["predictions_sha256"]:
      raise errors.UsageError(
        f"{pred} is not the file this run recorded for {name} in {path(run_dir)} (replaced or "
        "damaged): delete it, and `python -m ban_tf.report --run_dir=<run>` recomputes it from "
        "the SavedModel"
      )


def check(run_dir, name, gen_dir, *, saved_model=True, keras=False):
  """Raises errors.TeacherError unless `gen_dir`'s artefacts hash to `run_dir`'s entry `name`.

  Args:
    run_dir: the run directory holding manifest.json.
    name: the entry (gen_k, ensemble_k, baseline).
    gen_dir: the directory of the artefacts (run_dir/name, or a reader's copy).
    saved_model: check gen_dir/saved_model's fingerprint.
    keras: check gen_dir/model.keras's bytes.

  Returns:
    True when the entry exists (and matched), False when the manifest has no such
    entry (a run directory written before manifests existed): nothing is checked.
  """
  entry = read(run_dir).get(name)
  if entry is None:
    return False
  fix = (
    f"it was replaced, damaged or copied from elsewhere: restore it, or delete {name}/ (and every later "
    "generation and ensemble) to retrain it, or --overwrite"
  )
  if saved_model and "fingerprint_sha256" in entry:
    sm = os.path.join(gen_dir, layout.SAVED_MODEL)
    if fingerprint_digest(sm) != entry["fingerprint_sha256"]:
      raise errors.TeacherError(
        f"{sm} is not the model this run recorded for {name} in {path(run_dir)}: {fix}"
      )
  if keras and "keras_sha256" in entry:
    kp = os.path.join(gen_dir, layout.KERAS)
    if not os.path.exists(kp):
      raise errors.TeacherError(
        f"{kp} is missing: restore it, or delete {name}/ to retrain it, or --overwrite"
      )
    if file_digest(kp) != entry["keras_sha256"]:
      raise errors.TeacherError(
        f"{kp} is not the model.keras this run recorded for {name} in {path(run_dir)}: {fix}"
      )
  for fname, digest in (entry.get("files_sha256") or {}).items():
    fp = os.path.join(gen_dir, fname)
    if not os.path.exists(fp) or file_digest(fp) != digest:
      raise errors.TeacherError(
        f"{fp} is missing or not the file this run recorded for {name} in {path(run_dir)}: {fix}"
      )
  return True


def _why(e):
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
