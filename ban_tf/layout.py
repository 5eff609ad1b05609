"""The names of a run directory's files: rundir.py's vocabulary, importable without TensorFlow.

The layout itself (what each file holds, who writes it, in which order) is described
once, in rundir.py's docstring; rundir.py's handles are the only writers and readers.
This leaf holds only the names and the pure-Python path arithmetic that the
TensorFlow-free checks need too (checks.check_path, reached from Config.validate;
manifest.py). `tests/layout_test.py` keeps every other module from spelling a name.
"""

import os

# The run directory.
CONFIG = "config.json"  # the resolved flags (Config.to_dict), checked on resume
MANIFEST = "manifest.json"  # digests of every finished model (manifest.py)
RESULTS_JSON = "results.json"  # the run's rows (or, in a --seeds parent, their mean and std)
RESULTS_MD = "results.md"  # the same as a table
LOCK = ".lock"  # the fcntl lock, holding "pid P on HOST"
TENSORBOARD = "tb"  # tb/<row name>/: one TensorBoard run per row

# One model's directory: gen_k/, ensemble_k/, baseline/.
GEN = "gen"
ENSEMBLE = "ensemble"
BASELINE = "baseline"
SEED = "seed"  # seed_S/: one run directory per base seed of a --seeds parent
SAVED_MODEL = "saved_model"  # fingerprinted SavedModel (export.py)
SAVED_MODEL_PB = "saved_model.pb"  # TensorFlow's: what makes a directory a SavedModel
KERAS = "model.keras"  # the same model for plain Keras (stock layers)
METRICS = "metrics.json"  # what the model scored, and what it is (arch, seed, objective, ...)
HISTORY = "history.json"  # per-epoch logs of a trained model
CKPT = "ckpt"  # epoch checkpoints while a model trains (removed once it is DONE)
PREDICTIONS = "predictions.npz"  # per-example outputs on test (and val): predictions.py
DONE = "DONE"  # written last: the model is finished


def numbered(prefix, k):
  """gen_k, ensemble_k, seed_S."""
  return f"{prefix}_{k}"


def model_name(gen):
  """The directory (and manifest entry) of generation `gen`: gen_k, or baseline."""
  return BASELINE if gen == BASELINE else numbered(GEN, gen)


def number_of(name, prefix):
  """k of a directory named {prefix}_k, else None."""
  head, _, k = name.partition("_")
  return int(k) if head == prefix and k.isdigit() else None


def saved_model_of(path):
  """`path`'s SavedModel: `path` itself, or a model directory's saved_model/ (None: neither)."""
  if os.path.exists(os.path.join(path, SAVED_MODEL_PB)):
    return path
  inner = os.path.join(path, SAVED_MODEL)
  return inner if os.path.exists(os.path.join(inner, SAVED_MODEL_PB)) else None


def beside(saved_model, name):
  """The file `name` (KERAS, METRICS) of the model directory holding `saved_model`."""
  return os.path.join(os.path.dirname(os.path.abspath(saved_model)), name)
