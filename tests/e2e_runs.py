"""Finished tiny runs shared by the end-to-end test modules, and the checks several of them make.

A run is trained once per test process (`once`) and read by every module that asks for it; a
test that changes a run works on a copy (shutil.copytree into its tmp_path). `lm_run`: the
lm_e2e corpus, teacher and two BAN+L generations (lm_e2e_test, predictions_test).
`assert_image_outputs` and `assert_outputs_equal_a_recomputation`: a run's stored per-example
outputs (predictions.npz) against its reported numbers and against its SavedModels
(predictions_test on one replica, multireplica_test on two).
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

from ban_tf import config as config_lib
from ban_tf import main as main_lib
from ban_tf import manifest
from ban_tf import predictions
from ban_tf import results as results_lib
from ban_tf import tasks
from ban_tf import text_data

_RUNS = {}


def once(tmp_path_factory, key, train):
  """`train(directory)`'s result, computed once per process in a directory of its own.

  `tmp_path_factory`: pytest's (session-scoped) factory; `key`: names the run. Returns
  (directory, what `train` returned).
  """
  if key not in _RUNS:
    directory = str(tmp_path_factory.mktemp(key))
    _RUNS[key] = (directory, train(directory))
  return _RUNS[key]


# ---- language model: the lm_e2e corpus ----------------------------------------------------------

_WORDS = "the cat dog sat on mat a big small red ran fast slow house tree".split()
LM_LINES = {"train": 300, "valid": 50, "test": 50}  # lines (sentences) of each split


def lm_corpus(directory, seed=0, lines_per_split=None):
  """Writes a PTB-format corpus (ptb.{train,valid,test}.txt, `lines_per_split` lines, by
  default LM_LINES) into `directory`."""
  rng = np.random.RandomState(seed)
  for name, lines in (lines_per_split or LM_LINES).items():
    with open(os.path.join(directory, f"ptb.{name}.txt"), "w") as f:
      for _ in range(lines):
        # A little structure to learn: "the" is followed by a noun.
        words = [str(w) for w in rng.choice(_WORDS, rng.randint(3, 9))]
        words = [w if i == 0 or words[i - 1] != "the" else "cat" for i, w in enumerate(words)]
        f.write(" " + " ".join(words) + " \n")


def numpy_perplexity(models, ids, batch, bptt, state="carry"):
  """exp(mean token CE) of the mean of the models' softmax over every eval window.

  carry (--lm_state's default): one stateless call on the whole stream [<eos>] + ids,
  which is what carrying the state over its windows must equal; reset: the rows' windows.
  """
  total, count = 0.0, 0
  if state == "carry":
    stream = np.concatenate([[1], ids]).astype(np.int32)[None]  # <eos> = id 1
    wins = [(stream[:, :-1], stream[:, 1:])]
  else:
    wins = text_data.windows(text_data.batchify(ids, batch), bptt, full_only=False)
  for x, y in wins:
    probs = 0.0
    for m in models:
      z = keras.ops.convert_to_numpy(m(x)).astype(np.float64)
      z = np.exp(z - z.max(-1, keepdims=True))
      probs = probs + z / z.sum(-1, keepdims=True)
    probs /= len(models)
    total -= np.log(np.take_along_axis(probs, y[..., None], -1)).sum()
    count += y.size
  return float(np.exp(total / count))


LM_BATCH, LM_BPTT = 4, 6


def _train_lm(directory):
  lm_corpus(directory)
  cfg = config_lib.Config(
    task="lm",
    dataset="ptb",
    ptb_dir=directory,
    arch="lstm-1-16",
    gens=2,
    epochs=3,
    batch_size=LM_BATCH,
    bptt=LM_BPTT,
    lr=1.0,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    clip_norm=5.0,
    loss="ban_l",
    lr_plateau_decay=0.25,
    run_dir=os.path.join(directory, "run"),
    verbose="0",
    lr_plateau_min_delta=1000.0,
  )  # only epoch 1 improves (on inf): the rate decays after every later epoch
  return main_lib.run(cfg)


def lm_run(tmp_path_factory):
  """(corpus directory, run directory, main.run's summary) of the shared language-model run:
  lstm-1-16 on the lm_corpus, teacher + 2 BAN+L generations (BANE-2), 3 epochs each, batch
  LM_BATCH, bptt LM_BPTT, --lm_state=carry, one replica."""
  directory, summary = once(tmp_path_factory, "lm_run", _train_lm)
  return directory, os.path.join(directory, "run"), summary


# ---- stored per-example outputs ------------------------------------------------------------------


def rows(run_dir):
  """{row key ("Teacher", "BAN-1", ...): its results.json entry}."""
  with open(os.path.join(run_dir, "results.json")) as f:
    res = json.load(f)
  return {r.key: r.entry for r in results_lib.rows(res)}


def assert_image_outputs(run_dir, models, n_test, n_val):
  """Every model's stored outputs ({row key: model directory name}) reproduce the errors the
  run reported (on however many replicas it ran), to the example; the same test examples in
  the same order for every model; the manifest records each file's digest."""
  task = tasks.get("image")
  reported = rows(run_dir)
  labels = None
  for key, name in models.items():
    out = predictions.read(os.path.join(run_dir, name), task.prediction_arrays)
    assert set(out) == {"test", "val"}
    assert out["test"]["labels"].shape == (n_test,) and out["val"]["labels"].shape == (n_val,)
    assert out["test"]["probabilities"].dtype == np.float16
    # The reported error (the Distiller's, on the run's replicas; 1 - float32 accuracy) from the
    # stored outputs: the same count of wrong examples (one example = 100 / n points).
    assert task.headline_from(out["test"]) == pytest.approx(
      100 * reported[key]["test_error"], abs=1e-4
    )
    assert task.headline_from(out["val"]) == pytest.approx(
      100 * (1 - reported[key]["val_accuracy"]), abs=1e-4
    )
    np.testing.assert_allclose(
      out["test"]["probabilities"].astype(np.float32).sum(-1), 1, atol=5e-3
    )
    if labels is not None:
      np.testing.assert_array_equal(out["test"]["labels"], labels)  # the same examples, in order
    labels = out["test"]["labels"]
    entry = manifest.read(run_dir)[name]
    assert entry["predictions_sha256"] == manifest.file_digest(
      predictions.path(os.path.join(run_dir, name))
    )


def assert_outputs_equal_a_recomputation(run_dir, names, scratch):
  """What the run stored for each model directory in `names` equals its SavedModel's outputs
  recomputed here, on one device with the default strategy (in `scratch`, a new directory)."""
  with open(os.path.join(run_dir, "config.json")) as f:
    cfg = config_lib.Config.from_dict(json.load(f))
  task = tasks.get(cfg.task)
  dataset = task.load_data(cfg)
  for name in names:
    copy = os.path.join(scratch, name)
    shutil.copytree(os.path.join(run_dir, name, "saved_model"), os.path.join(copy, "saved_model"))
    task.store_predictions(cfg, dataset, copy)
    stored, again = predictions.read(os.path.join(run_dir, name)), predictions.read(copy)
    assert set(stored) == set(again) == {"test", "val"}
    for split in ("test", "val"):
      for k in task.prediction_arrays:
        np.testing.assert_array_equal(stored[split][k], again[split][k])
