"""Multi-replica runs report what they export (issue 12).

Over 1, 2 and 3 logical CPU replicas (tests/conftest.py) and split sizes that do
and do not divide the batch and the replica count:
* evaluation metrics are global: the accuracy, cross-entropy and perplexity of
  every example, as on one device (not a mean of the replicas' means);
* a replica's empty share of a last batch crashes nothing (data.py pads it with
  zero-weight examples, which change no number);
* BatchNorm keeps one set of statistics (averaged over replicas every step, or
  synchronised batch statistics with --sync_batchnorm);
* results.json, history.json and the exported SavedModels agree (ban_tf.evaluate);
* the run matrix on 2 and 3 replicas, image and language model: a fresh run, the
  same command again (skips everything, changes no file), a run stopped mid-generation
  and resumed (--deterministic: bit-identical to the whole run), evaluate and report.
"""

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from ban_tf import distiller as distiller_lib
from ban_tf import main as main_lib
from ban_tf import models
from tests import e2e_runs
from tests.conftest import REPO, SHARED_TFDS, run_main, strategy_for

C = 10
REPLICAS = [1, 2, 3]


def _ds(*arrays, batch):
  return tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(batch)


def _np_ce(logits, y):
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, y[:, None], -1)[:, 0]


def _identity_scorer(strategy):
  """A Distiller whose student's logits are its inputs: predictions are chosen by the test."""
  with strategy.scope():
    x = keras.Input((C,))
    student = keras.Model(x, keras.layers.Activation("linear", name="logits")(x))
    model = distiller_lib.Distiller(student)
    model.compile(optimizer=keras.optimizers.SGD(0.0))
  return model


# ---- fault 1: evaluation averaged the replicas' means ---------------------------------------------
def test_issue_example_33_of_65(strategy):
  """65 examples at batch 64: 0..31 and 64 right, 32..63 wrong.

  On two replicas replica 0 gets the 33 right ones and replica 1 the 32 wrong ones;
  a mean of their accuracies is 0.5000, the truth 33/65 = 0.507692.
  """
  y = np.zeros(65, np.int32)
  pred = np.zeros(65, np.int64)
  pred[32:64] = 1
  logits = (5.0 * np.eye(C)[pred]).astype(np.float32)
  model = _identity_scorer(strategy)
  got = model.evaluate(_ds(logits, y, batch=64), verbose=0, return_dict=True)
  assert set(got) == {"label_loss", "accuracy"}
  np.testing.assert_allclose(got["accuracy"], 33 / 65, rtol=1e-6)  # 0.507692
  np.testing.assert_allclose(got["label_loss"], _np_ce(logits, y).mean(), rtol=1e-5)


@pytest.mark.parametrize(
  "n", [48, 53, 7]
)  # divides batch and replicas; neither; < batch (3: [4, 3, 0])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_eval_metrics_are_global_for_any_split(strategy, n, padded):
  batch = 12
  rng = np.random.RandomState(n)
  logits = rng.normal(0, 2, (n, C)).astype(np.float32)
  y = rng.randint(0, C, n).astype(np.int32)
  want_acc = float(np.mean(logits.argmax(-1) == y))
  want_ce = _np_ce(logits, y).mean()
  if padded:  # as data.py does: a full last batch, the padding weighted 0
    pad = -n % batch
    w = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
    logits = np.r_[logits, 100 * np.ones((pad, C), np.float32)]  # wrong and huge CE if counted
    y = np.r_[y, np.full(pad, 3, np.int32)]
    ds = _ds(logits, y, w, batch=batch)
  else:
    ds = _ds(logits, y, batch=batch)
  got = _identity_scorer(strategy).evaluate(ds, verbose=0, return_dict=True)
  np.testing.assert_allclose(got["accuracy"], want_acc, rtol=1e-6)
  np.testing.assert_allclose(got["label_loss"], want_ce, rtol=1e-5)


# ---- language models: val_perplexity = exp(global token-mean CE) ------------------------------------
def _lm_windows(rows, length, bptt, vocab, seed):
  """Zaremba windows as text_data makes them: [rows, T], the last one shorter."""
  ids = np.random.RandomState(seed).randint(0, vocab, (rows, length)).astype(np.int32)
  out = []
  for s in range(0, length - 1, bptt):
    t = min(bptt, length - 1 - s)
    out.append((ids[:, s : s + t], ids[:, s + 1 : s + 1 + t]))
  return out


@pytest.mark.slow
def test_lm_perplexity_is_exp_of_global_token_mean(strategy):
  from ban_tf import lm_models  # pylint: disable=g-import-not-at-top

  vocab, rows, length, bptt = 13, 6, 13, 5  # windows of 5, 5 and 2 tokens
  wins = _lm_windows(rows, length, bptt, vocab, seed=3)
  keras.utils.set_random_seed(4)
  with strategy.scope():
    student = lm_models.build_model("lstm-1-8", vocab)
    for v in student.trainable_variables:  # confident: each replica's rows get their own CE
      v.assign(v * 60.0)
    model = distiller_lib.Distiller(student, perplexity=True)  # as the LM task builds it
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # fit below leaves the weights as they are
  # The golden CE from eager calls on one device (no distributed predict to trace per shape).
  logits = lambda x: keras.ops.convert_to_numpy(student(x)).reshape(-1, vocab)
  ce = np.concatenate([_np_ce(logits(x), y.reshape(-1)) for x, y in wins])
  ds = None
  for x, y in wins:
    d = tf.data.Dataset.from_tensors((x, y))
    ds = d if ds is None else ds.concatenate(d)
  got = model.evaluate(ds, verbose=0, return_dict=True)
  assert set(got) == {"label_loss", "accuracy", "perplexity"}
  np.testing.assert_allclose(got["label_loss"], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["perplexity"], math.exp(got["label_loss"]), rtol=1e-6)
  # Per-row weights apply to every token of the row: zero-weight rows count for nothing.
  w = np.r_[np.ones(rows // 2), np.zeros(rows - rows // 2)].astype(np.float32)
  weighted = tf.data.Dataset.from_tensor_slices(
    tuple(np.stack(a) for a in zip(*[(x, y) for x, y in wins[:2]]))
  ).map(lambda x, y: (x, y, w))
  half = np.concatenate(
    [_np_ce(logits(x[: rows // 2]), y[: rows // 2].reshape(-1)) for x, y in wins[:2]]
  )
  got_w = model.evaluate(weighted, verbose=0, return_dict=True)
  np.testing.assert_allclose(got_w["label_loss"], half.mean(), rtol=1e-5)
  # What the plateau schedule and history.json read: fit's validation logs.
  train = tf.data.Dataset.from_tensors(wins[0])
  hist = model.fit(train, validation_data=ds, epochs=1, verbose=0).history
  np.testing.assert_allclose(
    hist["val_perplexity"][-1], math.exp(hist["val_label_loss"][-1]), rtol=1e-6
  )
  np.testing.assert_allclose(hist["val_label_loss"][-1], ce.mean(), rtol=1e-5)
  assert "perplexity" not in hist  # training logs keep their own metrics


# ---- fault 3: per-replica BatchNorm statistics -------------------------------------------------------
def _bn_step(strategy, sync, x, y, lr=0.0):
  """One training step of a tiny BN net on the global batch (x, y); returns the student."""
  keras.utils.set_random_seed(11)
  with strategy.scope():
    student = models.build_model("tiny", C, x.shape[1:], name="bn_student")
    if sync:
      assert models.synchronize_batchnorm(student) > 0
    model = distiller_lib.Distiller(student)
    model.compile(optimizer=keras.optimizers.SGD(lr))
  model.fit(_ds(x, y, batch=len(x)), epochs=1, verbose=0, shuffle=False)
  return student


def _local_values(strategy, v):
  return [t.numpy() for t in strategy.experimental_local_results(v.value)]


@pytest.mark.parametrize("sync", [False, True], ids=["averaged", "sync_batchnorm"])
@pytest.mark.slow
def test_batchnorm_statistics_are_one_set(strategy, sync):
  rng = np.random.RandomState(0)
  x = rng.uniform(0, 255, (12, 8, 8, 3)).astype(np.float32)
  x[6:] *= 0.25  # replicas see different statistics
  y = rng.randint(0, C, 12).astype(np.int32)
  one = _bn_step(strategy_for(1), False, x, y)
  many = _bn_step(strategy, sync, x, y)
  stats = distiller_lib.moving_statistics(many)
  assert stats and len(stats) == len(distiller_lib.moving_statistics(one))
  for i, (v, ref) in enumerate(zip(stats, distiller_lib.moving_statistics(one))):
    local = _local_values(strategy, v)
    for other in local[1:]:
      np.testing.assert_array_equal(other, local[0])  # one set, on every replica
    if i == 0 or sync:
      # Synchronised batch statistics are those of the global batch, as on one
      # device. Averaged: the first layer's moving mean is that of the global batch
      # mean (later layers see inputs normalised with per-replica statistics).
      np.testing.assert_allclose(local[0], ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=v.path)
  if not sync and strategy.num_replicas_in_sync > 1:  # averaged per-replica variances differ
    var = [v for v in stats if "moving_variance" in v.path][0]
    ref = [v for v in distiller_lib.moving_statistics(one) if "moving_variance" in v.path][0]
    assert not np.allclose(var.numpy(), ref.numpy(), rtol=1e-3)


@pytest.mark.slow
def test_sync_batchnorm_trains_like_one_device():
  """Synchronised BN: a 3-replica step equals the one-device step on the global batch."""
  rng = np.random.RandomState(1)
  x = rng.uniform(0, 255, (12, 8, 8, 3)).astype(np.float32)
  x[4:8] *= 0.3
  y = rng.randint(0, C, 12).astype(np.int32)
  one = _bn_step(strategy_for(1), False, x, y, lr=0.1)
  three = _bn_step(strategy_for(3), True, x, y, lr=0.1)
  for a, b in zip(one.get_weights(), three.get_weights()):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  plain = _bn_step(strategy_for(3), False, x, y, lr=0.1)
  assert any(
    not np.allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(one.trainable_weights, plain.trainable_weights)
  )  # the test can fail


# ---- end to end: no crash, evaluate == results.json == history.json ---------------------------------
@contextlib.contextmanager
def _mock_fashion_mnist(num_examples):
  from ban_tf import bench  # pylint: disable=g-import-not-at-top

  with bench.tfds_mock(num_examples):
    yield


def _assert_evaluate_matches_results(run_dir):
  """ban_tf.evaluate (the SavedModels alone) == results.json == the final epoch of history.json.

  Accuracies to 1e-6 (absolute), perplexities to 1e-6 relative (results.json holds
  exp of a float32 mean); every generation and ensemble, val and test.
  """
  from ban_tf import evaluate, export  # pylint: disable=g-import-not-at-top

  results = export.read_json(os.path.join(run_dir, "results.json"))
  evaluated = evaluate.evaluate_run(run_dir)
  assert evaluated["splits"] == ["val", "test"]
  assert len(evaluated["generations"]) == len(results["generations"])
  assert len(evaluated["ensembles"]) == len(results["ensembles"])
  diffs = evaluate.differences(evaluated, results)
  assert {"val_accuracy", "test_accuracy"} <= set(diffs), diffs
  for field, diff in diffs.items():
    if field.endswith("perplexity"):
      worst = max(
        abs(r[field] / e[field] - 1)
        for r, e in zip(
          results["generations"] + results["ensembles"],
          evaluated["generations"] + evaluated["ensembles"],
        )
      )
      assert worst <= 1e-6, (field, worst)
    else:
      assert diff <= 1e-6, (field, diff)
  for g in results["generations"]:
    hist = export.read_json(os.path.join(run_dir, f"gen_{g['gen']}", "history.json"))
    np.testing.assert_allclose(hist[-1]["val_accuracy"], g["val_accuracy"], atol=1e-6)
    for h in hist:
      if "val_perplexity" in h:
        np.testing.assert_allclose(h["val_perplexity"], math.exp(h["val_label_loss"]), rtol=1e-6)
    if "val_perplexity" in g:
      np.testing.assert_allclose(hist[-1]["val_perplexity"], g["val_perplexity"], rtol=1e-6)
  return results


@pytest.mark.slow
@pytest.mark.parametrize("replicas,gens", [(1, 0), (2, 2)])
def test_run_exports_what_it_reports(tmp_path, capsys, monkeypatch, replicas, gens):
  """Mock fashion_mnist (100 examples per split), batch 12: the last test batch holds
  4 examples, the last val batch 1: a replica's share is empty, and the issue's command
  (2 replicas, 2 generations) crashed. The run directory's contract (_assert_run_directory:
  every file, teachers read from disk, results.json and results.md); the same command again
  skips every generation and changes no file. Stored per-example outputs reproduce the
  reported errors and (2 replicas) a one-device recomputation. 3 replicas (--sync_batchnorm,
  a share of 4, 0, 0): test_run_matrix_on_several_replicas."""
  from ban_tf import config, main  # pylint: disable=g-import-not-at-top
  from ban_tf import teacher as teacher_lib  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / "run")
  cfg = config.Config(
    dataset="fashion_mnist",
    arch="tiny",
    train_examples=60,
    val_examples=37,
    batch_size=12,
    epochs=2,
    gens=gens,
    num_cpu_devices=replicas,
    run_dir=run_dir,
    lr=0.05,
    verbose="0",
  )
  loaded = []  # every teacher the run loads
  real_load = teacher_lib.Teacher.load

  def spy(path, *args, **kwargs):
    loaded.append(os.path.abspath(path))
    return real_load(path, *args, **kwargs)

  with _mock_fashion_mnist(100):
    with monkeypatch.context() as m:
      m.setattr(teacher_lib.Teacher, "load", spy)
      summary = main.run(cfg)
    results = _assert_evaluate_matches_results(run_dir)
    _assert_run_directory(run_dir, gens, cfg.epochs, loaded, n_test=100)
    assert len(summary["generations"]) == gens + 1
    # Every generation's stored outputs (predictions.npz) give the reported errors, and equal
    # its SavedModel's outputs recomputed on one device (predictions_test.py's checks, here on
    # 2 replicas; their one-replica run is predictions_test's).
    gens_stored = {"Teacher" if g == 0 else f"BAN-{g}": f"gen_{g}" for g in range(gens + 1)}
    e2e_runs.assert_image_outputs(run_dir, gens_stored, n_test=100, n_val=37)
    if replicas > 1:
      scratch = str(tmp_path / "recomputed")
      e2e_runs.assert_outputs_equal_a_recomputation(run_dir, gens_stored.values(), scratch)
    again = []

    def rerun():
      capsys.readouterr()
      again.append(main.run(cfg))
      return capsys.readouterr().out

    _assert_rerun_changes_nothing(run_dir, rerun, gens)
  assert [g["test_accuracy"] for g in again[0]["generations"]] == [
    g["test_accuracy"] for g in results["generations"]
  ]
  assert len(results["generations"]) == gens + 1 and len(results["ensembles"]) == max(gens - 1, 0)


def _assert_run_directory(run_dir, gens, epochs, loaded, n_test):
  """The run directory of a finished image run of `gens` generations (the label loss, the
  default seed): generation k's teacher is generation k-1's SavedModel loaded from disk
  (`loaded`: the paths Teacher.load was given), every generation's files and TensorBoard run,
  checkpoints cleaned, metrics.json, history.json, the BANE-k ensembles, results.json's fields
  (plain JSON) and results.md's rows; accuracies count whole examples of the `n_test` test set."""
  from ban_tf import export  # pylint: disable=g-import-not-at-top

  assert loaded == [
    os.path.abspath(os.path.join(run_dir, f"gen_{k}", "saved_model")) for k in range(gens)
  ]
  stored = json.load(open(os.path.join(run_dir, "config.json")))
  assert stored["gens"] == gens and stored["resolved"]["loss"] == "ban"
  for k in range(gens + 1):
    gdir = os.path.join(run_dir, f"gen_{k}")
    for name in ("saved_model/saved_model.pb", "model.keras", "metrics.json", "history.json"):
      assert os.path.exists(os.path.join(gdir, name)), (k, name)
    assert os.path.exists(os.path.join(gdir, "DONE")), k
    row = "Teacher" if k == 0 else f"BAN-{k}"  # TensorBoard: one run per row, run_dir/tb/<row>
    assert glob.glob(os.path.join(run_dir, "tb", row, "events.out.tfevents.*"))
    assert not os.path.exists(os.path.join(gdir, "ckpt"))  # cleaned once DONE
    metrics = json.load(open(os.path.join(gdir, "metrics.json")))
    assert metrics["gen"] == k and metrics["seed"] == k
    assert metrics["teacher"] == (
      None if k == 0 else os.path.join(run_dir, f"gen_{k - 1}", "saved_model")
    )
    assert metrics["objective"]["loss"] == ("labels" if k == 0 else "ban")
    history = json.load(open(os.path.join(gdir, "history.json")))
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
  for k in range(2, gens + 1):
    assert os.path.exists(os.path.join(run_dir, f"ensemble_{k}", "saved_model", "saved_model.pb"))
    assert export.is_done(os.path.join(run_dir, f"ensemble_{k}"))

  res = json.load(open(os.path.join(run_dir, "results.json")))
  assert [g["gen"] for g in res["generations"]] == list(range(gens + 1))
  assert [g["role"] for g in res["generations"]] == ["teacher"] + [
    f"BAN-{k}" for k in range(1, gens + 1)
  ]
  for g in res["generations"]:
    assert {
      "gen",
      "role",
      "arch",
      "params",
      "test_accuracy",
      "test_error",
      "val_accuracy",
      "epochs",
      "seconds",
    } <= set(g)
    assert 0.0 <= g["test_accuracy"] <= 1.0
    assert g["test_error"] == pytest.approx(1.0 - g["test_accuracy"])
    assert g["epochs"] == epochs and g["arch"] == "tiny" and g["params"] > 0
  assert [e["members"] for e in res["ensembles"]] == [
    list(range(1, k + 1)) for k in range(2, gens + 1)
  ]
  assert res == json.loads(json.dumps(res))  # plain JSON types
  table = open(os.path.join(run_dir, "results.md")).read()
  rows = ["Teacher"] + [f"BAN-{k}" for k in range(1, gens + 1)]
  for row in rows + [f"BANE-{k}" for k in range(2, gens + 1)]:
    assert f"| {row} |" in table
  # Every member's and every ensemble's accuracy is a multiple of 1/n_test (the denominator is
  # the whole test set).
  for acc in [g["test_accuracy"] for g in res["generations"] + res["ensembles"]]:
    assert abs(acc * n_test - round(acc * n_test)) < 1e-4


def _synchronized_batchnorm(run_dir):
  """{BatchNormalization's `synchronized`} in gen_0/model.keras: whether --sync_batchnorm took effect."""
  with zipfile.ZipFile(os.path.join(run_dir, "gen_0", "model.keras")) as z:
    layers = json.loads(z.read("config.json"))["config"]["layers"]
  return {l["config"]["synchronized"] for l in layers if l["class_name"] == "BatchNormalization"}


# ---- the run matrix on several replicas: fresh, evaluate, rerun, kill and resume, report ----------
# Split sizes that divide neither the batch nor the replicas. Image: 200 train examples at
# batch 24 (the last 8 dropped), 50 val and 100 test (last batches of 2 and 4: on 3 replicas
# one share is empty). LM: a 96/28/28-line corpus (e2e_runs.lm_corpus) at batch 6 and bptt 7:
# 15/5/5 windows, the last of every split shorter (5/3/3 tokens); a third of the lm_e2e corpus's
# training steps, which on 2-3 replicas cost about 50 ms each.
_IMAGE = [
  "--task=image",
  "--dataset=fashion_mnist",
  f"--data_dir={SHARED_TFDS}",
  "--arch=tiny",
  "--train_examples=200",
  "--val_examples=50",
  "--test_split=test[:100]",
  "--batch_size=24",
  "--lr=0.05",
]


_LM_BATCH, _LM_BPTT = 6, 7
_LM_LINES = {"train": 96, "valid": 28, "test": 28}


def _lm_argv(directory):
  e2e_runs.lm_corpus(directory, lines_per_split=_LM_LINES)
  return [
    "--task=lm",
    "--dataset=ptb",
    f"--ptb_dir={directory}",
    "--arch=lstm-1-16",
    f"--batch_size={_LM_BATCH}",
    f"--bptt={_LM_BPTT}",
    "--lr=1.0",
    "--momentum=0",
    "--weight_decay=0",
    "--clip_norm=5",
    "--loss=ban_l",
  ]


_SERIES = ("generations", "ensembles", "baseline")  # report.SERIES_DIRS


def _files(run_dir):
  """{file: (sha256, mtime_ns)} of a run directory, but for what every process rewrites by
  design: the lock, log.txt (appended) and report.py's TensorBoard files (the hparams
  sessions, the ensembles' runs tb/BANE-k and the series over generations, replaced whole)."""
  out = {}
  for parent, _, names in os.walk(run_dir):
    for name in names:
      path = os.path.join(parent, name)
      rel = os.path.relpath(path, run_dir)
      if (
        name in (".lock", "log.txt")
        or name.endswith(".hparams")
        or rel.startswith(os.path.join("tb", "BANE-"))
        or (rel.startswith("tb" + os.sep) and rel.split(os.sep)[1].split("_ci95")[0] in _SERIES)
      ):
        continue
      with open(path, "rb") as f:
        out[rel] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


def _assert_rerun_changes_nothing(run_dir, rerun, gens):
  """`rerun()` (the same command again; returns its console text) on a finished run: every
  generation skipped, nothing trained, every file byte-identical and every generation's and
  ensemble's file untouched (the top level's results, config and report are rewritten
  with the same bytes)."""
  before = _files(run_dir)
  out = rerun()
  skipped = [l for l in out.splitlines() if l.endswith("done before, skipped")]
  assert [l.split()[1] for l in skipped] == [f"{g}/{gens}" for g in range(gens + 1)], out
  assert not re.search(r" epoch \d+/\d+:", out) and "resuming" not in out, out  # nothing trained
  after = _files(run_dir)
  assert sorted(after) == sorted(before)
  assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
  untouched = lambda files: {k: v for k, v in files.items() if k.startswith(("gen_", "ensemble_"))}
  assert untouched(after) == untouched(before) and untouched(before)


def _outputs(run_dir, gens, *run_dirs):
  """What a run reports, wall-clock fields aside and `run_dirs` as <run>: results.json,
  every generation's metrics.json and history.json, and its SavedModel's fingerprint outputs."""

  def load(rel):
    with open(os.path.join(run_dir, rel)) as f:
      text = f.read()
    for d in run_dirs:
      text = text.replace(os.path.abspath(d), "<run>")
    return _drop_seconds(json.loads(text))

  out = {"results.json": load("results.json")}
  for g in range(gens + 1):
    for name in ("metrics.json", "history.json"):
      out[f"gen_{g}/{name}"] = load(f"gen_{g}/{name}")
    out[f"gen_{g}/fingerprint"] = np.load(
      os.path.join(run_dir, f"gen_{g}", "saved_model", "fingerprint.npz")
    )["outputs"].tolist()
  return out


def _drop_seconds(x):
  if isinstance(x, dict):
    return {k: _drop_seconds(v) for k, v in x.items() if k != "seconds"}
  if isinstance(x, list):
    return [_drop_seconds(v) for v in x]
  return x


@pytest.mark.slow
@pytest.mark.parametrize(
  "task,replicas,gens,epochs,kill,extra,full",
  [
    (
      "image",
      2,
      0,
      2,
      "sigkill",
      [],
      False,
    ),  # evaluate and rerun: test_run_exports_what_it_reports
    ("image", 3, 0, 2, "enospc", ["--sync_batchnorm"], True),
    ("lm", 2, 1, 2, "enospc", ["--lm_state=reset"], True),
    (
      "lm",
      2,
      0,
      2,
      "enospc",
      [],
      False,
    ),  # --lm_state=carry; evaluate: lm-3replica-carry, rerun: lm-2replica-reset
    ("lm", 3, 2, 2, "enospc", [], True),
  ],
  ids=[
    "image-2replica",
    "image-3replica-sync_batchnorm",
    "lm-2replica-reset",
    "lm-2replica-carry",
    "lm-3replica-carry",
  ],
)
def test_run_matrix_on_several_replicas(
  task, replicas, gens, epochs, kill, extra, full, tmp_path, monkeypatch, capsys, caplog
):
  """One cell per (task, replicas, state), in this process (--deterministic):

  1. a fresh run (with gens >= 1: of gens - 1 generations, copied for step 4, then the
     same command with --gens=gens extends it);
  2. (full) ban_tf.evaluate == results.json == history.json, and for LM NumPy on model.keras;
  3. (full) the same command again skips everything and changes no file;
  4. (kill) the copy (or a new run) stopped by a full disk where the last generation's
     epoch-2 checkpoint is saved (epoch 1's is kept), or (image, 2 replicas) a process
     SIGKILLed right after the epoch-1 checkpoint, then resumed by the same command:
     results, metrics, history and SavedModel outputs bit-identical to step 1's;
  5. (full, gens >= 1) ban_tf.report.
  Not full: the row's steps 2, 3 and 5 are another row's or test's (named in its comment).
  This test is about the replicas: restoring mirrored variables (BatchNorm statistics
  averaged or synchronised), carried state and optimizer slots, also in a new process.
  """
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  argv = (
    (_IMAGE if task == "image" else _lm_argv(str(tmp_path)))
    + extra
    + [f"--epochs={epochs}", "--deterministic", "--verbose=0", f"--num_cpu_devices={replicas}"]
  )
  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  main = lambda run_dir, g=gens: run_main(
    monkeypatch, capsys, argv + [f"--gens={g}", f"--run_dir={run_dir}"]
  )
  if gens >= 1:
    code, out, err = main(whole, gens - 1)
    assert code == 0, err
    shutil.copytree(whole, broken)
  code, out, err = main(whole)
  assert code == 0, err
  assert out.splitlines()[0].endswith(f", {replicas} replicas"), out
  assert f"gen {gens}/{gens} BAN-{gens} epoch {epochs}/{epochs}:" in out or gens == 0, out

  if task == "image":
    assert _synchronized_batchnorm(whole) == {"--sync_batchnorm" in extra}  # the flag took effect
  if full:
    results = _assert_evaluate_matches_results(whole)
    if task == "lm":
      _assert_lm_matches_numpy(
        whole, results, str(tmp_path), "reset" if "--lm_state=reset" in extra else "carry"
      )
    _assert_rerun_changes_nothing(whole, lambda: _check_ok(main(whole)), gens)

  if kill == "sigkill":  # a real SIGKILL of the process, right after the epoch-1 checkpoint
    env = dict(
      os.environ, BAN_TF_FAULT=f"kill_after_checkpoint@gen_{gens}/epoch_1", TF_CPP_MIN_LOG_LEVEL="2"
    )
    proc = subprocess.run(
      [sys.executable, "-m", "ban_tf.main"] + argv + [f"--gens={gens}", f"--run_dir={broken}"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].endswith(f", {replicas} replicas"), proc.stdout
  elif kill == "enospc":  # stopped by a full disk where the epoch-2 checkpoint is saved
    monkeypatch.setenv("BAN_TF_FAULT", f"enospc@gen_{gens}/epoch_2")
    code, _, err = main(broken)
    assert code == 2 and "no space left" in err, err
    monkeypatch.delenv("BAN_TF_FAULT")
  if kill:
    assert not os.path.exists(os.path.join(broken, f"gen_{gens}", "DONE"))
    with caplog.at_level(logging.INFO, logger="absl"):
      code, out, err = main(broken)
    assert code == 0, err
    assert f"gen {gens}: resuming from epoch 1" in caplog.text and "(resuming at epoch 2)" in out
    want, got = _outputs(whole, gens, whole, broken), _outputs(broken, gens, whole, broken)
    assert list(got) == list(want)
    for key in want:
      assert got[key] == want[key], key

  if full and gens >= 1:  # a table of generations (image's one-row report: tasks_contract_test)
    paths = report.write_report(broken if kill else whole, hparams=False)
    md = open(paths["results_md"]).read()
    assert "| BAN-1 |" in md and ("| BANE-2 |" in md) == (gens >= 2), md
    with open(paths["png"], "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_execution_steps_divide_the_epoch():
  from ban_tf import train  # pylint: disable=g-import-not-at-top

  got = [
    train.execution_steps(r, n) for r, n in ((3, 8), (8, 8), (100, 8), (1, 8), (5, 7), (4, 12))
  ]
  assert got == [2, 8, 8, 1, 1, 4]


def _iterations(prefix):
  """The optimizer's step counter saved in checkpoint `prefix`."""
  reader = tf.train.load_checkpoint(prefix)
  (key,) = [k for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/_iterations/")]
  return int(reader.get_tensor(key))


@pytest.mark.slow
@pytest.mark.parametrize(
  "task,replicas", [("image", 1), ("image", 2), ("lm", 3)], ids=lambda v: str(v)
)
def test_steps_per_execution_keeps_epoch_boundaries(task, replicas, tmp_path, monkeypatch, capsys):
  """--steps_per_execution that does not divide the steps per epoch (3 with 8) once moved every
  epoch boundary (steps 9, 18, 24 instead of 8, 16, 24), and so validation, checkpoints, history
  and the schedules. Now epoch 2's checkpoint is taken at step 2 x steps, and a run stopped there
  and resumed is bit-identical to an uninterrupted one (--deterministic). On one replica the
  value may change on resume and the uninterrupted run has 1 step per call: bit-identical too.
  On several, a compiled call of k steps rounds the image step's sums differently (last bits of
  the losses, seen on 2 replicas), so both runs use the same value there, and the logged
  training means are compared to one float32 ulp (_assert_equal_but_training_logs_to_an_ulp)."""
  from ban_tf import tasks  # pylint: disable=g-import-not-at-top

  base = (_IMAGE if task == "image" else _lm_argv(str(tmp_path))) + [
    "--gens=0",
    "--epochs=3",
    "--deterministic",
    "--verbose=0",
    f"--num_cpu_devices={replicas}",
  ]
  fv = flags.FlagValues()
  main_lib.define_flags(fv)
  fv(["prog"] + base)
  cfg = main_lib.config_from_flags(fv)
  steps = tasks.get(cfg.task).load_data(cfg).steps_per_epoch(cfg.batch_size)
  per_call = next(k for k in range(3, steps) if steps % k)  # moved the boundaries once
  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  main = lambda run_dir, k: run_main(
    monkeypatch, capsys, base + [f"--steps_per_execution={k}", f"--run_dir={run_dir}"]
  )
  one = replicas == 1
  _check_ok(main(whole, 1 if one else per_call))
  monkeypatch.setenv("BAN_TF_FAULT", "enospc@gen_0/epoch_3")  # stops where epoch 3 is saved
  code, _, err = main(broken, per_call)
  monkeypatch.delenv("BAN_TF_FAULT")
  assert code == 2 and "no space left" in err, err
  assert _iterations(os.path.join(broken, "gen_0", "ckpt", "ckpt-2")) == 2 * steps
  _check_ok(main(broken, per_call + 1 if one else per_call))  # one replica: yet another value
  want, got = _outputs(whole, 0, whole, broken), _outputs(broken, 0, whole, broken)
  for key in want:
    if one:
      assert got[key] == want[key], key
    else:
      _assert_equal_but_training_logs_to_an_ulp(got[key], want[key], key)


def _assert_equal_but_training_logs_to_an_ulp(got, want, where, logged=False):
  """got == want exactly, except the training epochs' logged means (history.json rows,
  metrics.json's final_train), which may differ by one float32 ulp.

  Why: seen once in CI (2 replicas, under load): epoch 2's history `loss`
  2.2083215713500977 vs 2.2083218097686768, one float32 ulp, with every weight, checkpoint,
  evaluation and the other logged means bit-identical; not reproduced in 4 repeats under
  load 17 nor in 4 in-process repeats. The likely cause (not proven): a call of k > 1 steps
  is Keras' tf.while_loop over a tf.cond holding the step, whose iterations TensorFlow may
  overlap (a stateless loop condition), so the order in which the steps' values are added
  into a metric's running total is not fixed. Weights (fingerprint), evaluations and counts
  stay exact here.
  """
  logged = logged or where.endswith("history.json")
  if isinstance(want, dict):
    assert isinstance(got, dict) and got.keys() == want.keys(), where
    for k in want:
      inner = logged or k == "final_train"
      _assert_equal_but_training_logs_to_an_ulp(got[k], want[k], f"{where}/{k}", inner)
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_equal_but_training_logs_to_an_ulp(g, w, f"{where}[{i}]", logged)
  elif logged and isinstance(want, float) and isinstance(got, float):
    np.testing.assert_array_max_ulp(np.float32(got), np.float32(want), maxulp=1)
  else:
    assert got == want, (where, got, want)


def _check_ok(result):
  code, out, err = result
  assert code == 0, err
  return out


def _assert_lm_matches_numpy(run_dir, results, ptb_dir, state):
  """The last row's val perplexity (BANE-k if any) == NumPy on its model.keras files."""
  from ban_tf import text_data  # pylint: disable=g-import-not-at-top

  ids = text_data.TextDataset("ptb", ptb_dir=ptb_dir, bptt=_LM_BPTT).ids
  row = (results["ensembles"] or results["generations"])[-1]
  members = [
    keras.saving.load_model(os.path.join(run_dir, f"gen_{g}", "model.keras"), compile=False)
    for g in row.get("members", [row.get("gen")])
  ]
  want = e2e_runs.numpy_perplexity(members, ids["val"], _LM_BATCH, _LM_BPTT, state)
  np.testing.assert_allclose(row["val_perplexity"], want, rtol=1e-5)


# ---- evaluation reads its pipeline once (issue 23's intermittent 2-replica count) -----------------------
def _scorer(strategy, seed=5):
  with strategy.scope():
    keras.utils.set_random_seed(seed)
    x = keras.Input((8, 8, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 3, activation="relu")(x / 255))
    model = distiller_lib.Distiller(keras.Model(x, keras.layers.Dense(5)(h)))
    model.compile()
  return model


def _images(n, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (n, 8, 8, 3)).astype(np.float32), rng.randint(0, 5, n).astype(np.int32)


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_evaluation_draws_its_input_once(replicas):
  """Distiller.evaluate iterates its input once. Keras' symbolic build once drew a first batch
  from a second iterator over it, left running (prefetching, and writing the evaluation
  pipeline's shared in-memory cache) while the scored one started: under load the Teacher row
  was scored 388/516 where plain Keras gives 379/512. A source that refuses a second pass
  catches the second iterator every time."""
  x, y = _images(50)
  passes = []

  def once():
    passes.append(1)
    assert len(passes) == 1, "the evaluation input was iterated twice"
    yield from zip(x, y, np.ones(len(y), np.float32))

  spec = (
    tf.TensorSpec((8, 8, 3), tf.float32),
    tf.TensorSpec((), tf.int32),
    tf.TensorSpec((), tf.float32),
  )
  pad = (np.zeros((1, 8, 8, 3), np.float32), np.zeros(1, np.int32), np.zeros(1, np.float32))
  ds = (
    tf.data.Dataset.from_generator(once, output_signature=spec)
    .concatenate(tf.data.Dataset.from_tensor_slices(pad).repeat(4))  # 54: 3 full batches of 18
    .batch(18)
  )
  model = _scorer(strategy_for(replicas))
  got = model.evaluate(ds, verbose=0, return_dict=True)
  want = np.mean(np.argmax(model.student(tf.constant(x)).numpy(), -1) == y)
  assert passes == [1] and got["accuracy"] == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.slow
def test_repeated_evaluations_of_a_padded_cached_split_are_exact(replicas):
  """10 evaluations on 2 and 3 replicas of the data.py pipeline (cached, last batch padded with
  zero-weight examples): every one gives NumPy's count on the real examples."""
  from ban_tf import data  # pylint: disable=g-import-not-at-top

  x, y = _images(100, seed=1)
  fake = data.Dataset.__new__(data.Dataset)  # only what _eval reads: an 8x8x3 data set's info
  fake.info = type("I", (), {"image_shape": (8, 8, 3)})()
  src = tf.data.Dataset.from_tensor_slices((x.astype(np.uint8), y))
  model = _scorer(strategy_for(replicas))
  want = np.mean(np.argmax(model.student(tf.constant(x)).numpy(), -1) == y)
  for _ in range(10):
    ds = fake._eval(src, 100, 24)  # pylint: disable=protected-access  (4 x 24 + 4 padded)
    got = model.evaluate(ds, verbose=0, return_dict=True)["accuracy"]
    assert got == pytest.approx(want, abs=1e-7)


# ---- data.py: the padded evaluation pipeline ---------------------------------------------------------
@pytest.mark.parametrize("n,batch", [(13, 6), (12, 6), (4, 6)])
def test_eval_pipeline_pads_last_batch_with_zero_weights(n, batch):
  from ban_tf import data  # pylint: disable=g-import-not-at-top

  ds = data.Dataset(
    "fashion_mnist", SHARED_TFDS, train_split="train[:40]", val_examples=n, test_split="test[:10]"
  )
  batches = [[t.numpy() for t in b] for b in ds.val(batch)]
  assert all(len(b) == 3 and b[0].shape[0] == batch for b in batches)  # every batch full
  assert len(batches) == -(-n // batch)  # no extra batch
  w = np.concatenate([b[2] for b in batches])
  np.testing.assert_array_equal(
    w, np.r_[np.ones(n), np.zeros(len(w) - n)]
  )  # real examples first, in order
  ref = data.Dataset("fashion_mnist", SHARED_TFDS, train_split="train[:40]", test_split="test[:10]")
  tail = np.stack([x for x, _ in ref._train_src.skip(40 - n)])  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.concatenate([b[0] for b in batches])[:n], tail)
