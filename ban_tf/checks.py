"""The input and path checks that run before TensorFlow loads: standard library only.

A bad flag or path is reported in well under a second (Config.validate, main.run)
because nothing on that path imports TensorFlow, Keras or tfds. The checks that
need nothing heavier than `os` and `json` live here, so that the modules that own
the rest of a concern (pretrained.py: loading, checking and importing a --teacher)
can import TensorFlow at their top. `tests/imports_test.py` keeps this module, and
Config validation, free of TensorFlow.

--teacher=PATH (pretrained.py's docstring has the accepted forms):

* `check_path`: which form PATH is, or a one-line UsageError;
* `imported_into`: whether a run directory already holds PATH as its gen_0 (it then
  resumes without the file);
* `source_sha256`: the digest recorded in gen_0/metrics.json[SOURCE_KEY] that a rerun
  compares (pretrained.check_source).
"""

import glob
import hashlib
import json
import os

from ban_tf import errors
from ban_tf import layout

# The kinds of --teacher PATH (check_path).
GENERATION, SAVED_MODEL, KERAS = "generation", "saved_model", "keras"
SOURCE_KEY = (
  "source"  # gen_0/metrics.json: {"path" (absolute), "given", "kind", "outputs", "sha256"}
)


def check_path(path):
  """(kind, saved_model_dir or .keras path) of a --teacher PATH; pure Python.

  Raises:
    errors.UsageError: PATH does not exist, or is none of the accepted forms.
  """
  if not os.path.exists(path):
    raise errors.UsageError(f"--teacher={path}: no such file or directory")
  if os.path.isfile(path):
    if path.endswith(".keras"):
      return KERAS, path
    raise errors.UsageError(
      f"--teacher={path}: a file must be a .keras model; pass a SavedModel "
      "or a ban_tf generation directory as its directory"
    )
  inner = os.path.join(path, layout.SAVED_MODEL)
  if os.path.exists(os.path.join(inner, layout.SAVED_MODEL_PB)):
    return GENERATION, inner
  if os.path.exists(os.path.join(path, layout.SAVED_MODEL_PB)):
    return SAVED_MODEL, path
  raise errors.UsageError(
    f"--teacher={path}: holds neither saved_model.pb nor saved_model/ (a ban_tf gen_k/ "
    "directory): pass a SavedModel directory, a generation directory or a .keras file"
  )


def imported_into(run_dir, path):
  """Whether a run directory (or one of its seed_S/ runs) already holds `path` as its gen_0.

  Such a run resumes without the file: its gen_0/ holds the copy the students learned from.
  `path` matches the absolute path recorded, or the --teacher text as given (a relative
  path rerun from another directory, where it names nothing or, if it names a file,
  `pretrained.check_source` compares its bytes).
  """
  gen0 = layout.model_name(0)
  for gen_dir in [os.path.join(run_dir, gen0)] + glob.glob(
    os.path.join(run_dir, layout.numbered(layout.SEED, "*"), gen0)
  ):
    metrics = os.path.join(gen_dir, layout.METRICS)
    if os.path.exists(os.path.join(gen_dir, layout.DONE)) and os.path.exists(metrics):
      with open(metrics) as f:
        source = json.load(f).get(SOURCE_KEY) or {}
        if source.get("path") == os.path.abspath(path) or source.get("given") == path:
          return True
  return False


def source_sha256(path):
  """sha256 over a file's bytes, or a directory's files (relative names and bytes, sorted)."""
  h = hashlib.sha256()
  if os.path.isfile(path):
    files = [(os.path.basename(path), path)]
  else:
    files = sorted(
      (os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
      for d, _, names in os.walk(path)
      for f in names
    )
  for rel, full in files:
    h.update(rel.encode() + b"\0")
    with open(full, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()
