"""Per-example outputs of one finished model: the file a paired comparison reads (stats.py).

Every finished model directory (gen_k/, ensemble_k/, baseline/) holds FILE beside
its SavedModel: an uncompressed NumPy .npz archive with, per evaluated split S
("test", and "val" when the run has one), arrays named "S.<name>" in the order the
split's evaluation pipeline scores them (the order is the pairing: two models of
one run, or of runs over the same test set, are compared element by element):

- image classification (tasks/image.py): "S.probabilities" float16 [N, C] (softmax
  of the logits, or the ensemble's mean probabilities), "S.labels" int32 [N],
  "S.predicted" int32 [N] (argmax of the float32 outputs: what the reported
  accuracy counted; float16 may tie two classes that float32 separates).
- language modelling (tasks/lm.py): "S.nll" float32 [T] (per-token negative
  log-likelihood, nats, scored as the run's evaluation scores: over one stream with
  the LSTM state carried under --lm_state=carry), "S.labels" int32 [T] (the target
  token ids), "S.sentence" int32 [T] (the sentence of each token: the resampling
  unit of the bootstrap; a sentence is one line of the corpus, ended by <eos>).

plus "meta": a JSON string {"version", "task", "splits"}. Written atomically
(temporary file in the same directory, fsync, rename), so a reader sees the whole
file or none. NumPy only (no TensorFlow): reports read it without loading a model.
"""

import json
import os
import zipfile

import numpy as np

from ban_tf import errors
from ban_tf import layout

FILE = layout.PREDICTIONS
VERSION = 1


def path(model_dir: str) -> str:
  """model_dir/predictions.npz."""
  return os.path.join(model_dir, FILE)


def exists(model_dir: str) -> bool:
  return os.path.exists(path(model_dir))


def check_path(model_dir: str) -> None:
  """Raises errors.RunDirError when model_dir/predictions.npz is a directory (a damaged or
  hostile run directory), naming it and the fix; before anything reads or writes it (`read`,
  `write`, rundir.ModelDir.make before a model trains, report.attach_comparisons)."""
  p = path(model_dir)
  if os.path.isdir(p):
    raise errors.RunDirError(
      f"{p} is a directory where the model's per-example outputs file belongs (a damaged run "
      f"directory): remove it (rm -r {p}) and rerun; the file is recomputed from the SavedModel"
    )


def write(model_dir: str, splits: dict, *, task: str) -> str:
  """Writes model_dir/predictions.npz atomically; returns its path.

  Args:
    model_dir: the model's directory (gen_k/, ensemble_k/, baseline/).
    splits: {split name: {array name: numpy array}}; every array of a split has the
      same length along axis 0 (one entry per example or token).
    task: the task's name (tasks.get), recorded in meta.

  Raises:
    ValueError: an empty split, or arrays of a split with different lengths.
    errors.RunDirError: the file's place is taken by a directory (`check_path`); nothing
      is written.
  """
  check_path(model_dir)
  arrays = {}
  for split, named in splits.items():
    _check_split(split, named, "write")
    for name, a in named.items():
      arrays[f"{split}.{name}"] = np.asarray(a)
  meta = {"version": VERSION, "task": task, "splits": list(splits)}
  arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
  final = path(model_dir)
  tmp = os.path.join(model_dir, f".tmp-{os.getpid()}-{FILE}")
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, final)
  return final


def _check_split(split, named, what):
  lengths = {name: np.shape(a)[0] if np.ndim(a) else None for name, a in named.items()}
  if not named or None in lengths.values() or len(set(lengths.values())) != 1:
    raise ValueError(f"{what}: split {split!r} needs non-empty arrays of one length, got {lengths}")
  if next(iter(lengths.values())) == 0:
    raise ValueError(f"{what}: split {split!r} is empty")


def read(model_dir: str, required=()) -> dict:
  """{split: {array name: numpy array}} of model_dir/predictions.npz.

  Args:
    model_dir: the model's directory.
    required: array names every split must hold (the task's `prediction_arrays`).

  Raises:
    errors.UsageError: no such file, or it is damaged (not an .npz, no readable meta,
      a split or array missing, arrays of a split with different lengths, NaN NLLs):
      the message names the file and the fix (delete it: `python -m ban_tf.report`
      or `ban_tf.evaluate --run_dir` recompute it from the SavedModel); a directory in
      its place (`check_path`).
  """
  check_path(model_dir)
  p = path(model_dir)
  fix = "delete it, and `python -m ban_tf.report --run_dir=<run>` recomputes it from the SavedModel"
  if not os.path.exists(p):
    raise errors.UsageError(f"{p} is missing: {fix}")
  try:
    with np.load(p, allow_pickle=False) as data:
      meta = json.loads(str(data["meta"]))
      if meta.get("version") != VERSION:
        raise ValueError(f"version {meta.get('version')!r}, not {VERSION}")
      out = {}
      for split in meta["splits"]:
        named = {k.split(".", 1)[1]: data[k] for k in data.files if k.startswith(f"{split}.")}
        missing = [n for n in required if n not in named]
        if missing:
          raise ValueError(f"split {split!r} lacks {', '.join(missing)}")
        _check_split(split, named, "read")
        for name, a in named.items():
          if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise ValueError(f"{split}.{name} holds NaN or Inf")
        out[split] = named
  except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
    why = str(e).splitlines()[0] if str(e) else ""
    raise errors.UsageError(
      f"{p} is damaged ({type(e).__name__}{': ' + why if why else ''}): {fix}"
    ) from None
  return out
