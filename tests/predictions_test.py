"""Per-example outputs (predictions.py): the file format, what runs store, and what reports derive.

Fast: the file format (round trip, damaged files), the LM sentence layout, the results tables.
Slow (one tiny image run on one replica, and lm_e2e_test's LM run, e2e_runs.lm_run): every
finished model's stored outputs reproduce the numbers the run reported (error, perplexity),
results.json rows carry the paired comparisons, a run without stored outputs gets them from
report/evaluate, a damaged file is an error naming the fix. The same image checks on two
replicas: multireplica_test.py::test_run_exports_what_it_reports.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest

from ban_tf import errors
from ban_tf import manifest
from ban_tf import predictions
from ban_tf import results as results_lib
from ban_tf import stats
from tests import e2e_runs
from tests.conftest import SHARED_TFDS
from tests.conftest import run_main_once

# ---- the file format -----------------------------------------------------------------------------


def _arrays(n=7, c=3, seed=0):
  rng = np.random.default_rng(seed)
  p = rng.random((n, c)).astype(np.float16)
  return {
    "probabilities": p,
    "labels": rng.integers(0, c, n).astype(np.int32),
    "predicted": np.argmax(p, -1).astype(np.int32),
  }


REQUIRED = ("probabilities", "labels", "predicted")


def test_round_trip_is_atomic_and_exact(tmp_path):
  splits = {"test": _arrays(7), "val": _arrays(4, seed=1)}
  path = predictions.write(str(tmp_path), splits, task="image")
  assert path == os.path.join(str(tmp_path), predictions.FILE)
  assert os.listdir(tmp_path) == [predictions.FILE]  # no temporary file left
  back = predictions.read(str(tmp_path), REQUIRED)
  assert list(back) == ["test", "val"]
  for split in splits:
    for name, a in splits[split].items():
      assert back[split][name].dtype == a.dtype
      np.testing.assert_array_equal(back[split][name], a)


def test_manifest_names_the_same_file():
  assert manifest.PREDICTIONS_FILE == predictions.FILE


def test_recomputed_file_replaces_the_recorded_digest(tmp_path):
  # The fix a damaged file's error names: delete it; the report recomputes it and records the new
  # file's digest in place of the old one (an entry that already recorded one must not break it).
  run_dir = str(tmp_path)
  gen = os.path.join(run_dir, "gen_1")
  os.makedirs(gen)
  predictions.write(gen, {"test": _arrays(seed=0)}, task="image")
  manifest.record(run_dir, "gen_1", fingerprint="f", predictions_sha256="0" * 64)
  with pytest.raises(errors.UsageError, match="not the file this run recorded"):
    manifest.check_predictions(run_dir, "gen_1", gen)
  os.remove(predictions.path(gen))
  predictions.write(gen, {"test": _arrays(seed=1)}, task="image")
  manifest.add_predictions(run_dir, "gen_1", gen)
  entry = manifest.read(run_dir)["gen_1"]
  assert entry == {
    "fingerprint": "f",
    "predictions_sha256": manifest.file_digest(predictions.path(gen)),
  }
  manifest.check_predictions(run_dir, "gen_1", gen)  # no error: the new file is the recorded one


def test_write_refuses_ragged_or_empty_splits(tmp_path):
  bad = _arrays(5)
  bad["labels"] = bad["labels"][:4]
  with pytest.raises(ValueError, match="one length"):
    predictions.write(str(tmp_path), {"test": bad}, task="image")
  with pytest.raises(ValueError, match="empty"):
    predictions.write(str(tmp_path), {"test": _arrays(0)}, task="image")
  assert not os.path.exists(predictions.path(str(tmp_path)))


@pytest.mark.parametrize(
  "damage,why",
  [
    ("truncate", "damaged"),
    ("garbage", "damaged"),
    ("missing_array", "lacks predicted"),
    ("nan", "NaN"),
    ("ragged", "one length"),
  ],
)
def test_damaged_file_is_a_usage_error_naming_the_fix(tmp_path, damage, why):
  d = str(tmp_path)
  arrays = _arrays(6)
  if damage == "missing_array":
    del arrays["predicted"]
  if damage == "nan":
    arrays["probabilities"][2, 1] = np.nan
  p = predictions.write(d, {"test": arrays}, task="image")
  if damage == "truncate":
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
  elif damage == "garbage":
    open(p, "wb").write(b"not a zip at all")
  elif damage == "ragged":  # written by hand: write() refuses it
    np.savez(
      p,
      meta=np.asarray(json.dumps({"version": 1, "task": "image", "splits": ["test"]})),
      **{"test.probabilities": arrays["probabilities"], "test.labels": arrays["labels"][:3]},
      **{"test.predicted": arrays["predicted"]},
    )
  with pytest.raises(errors.UsageError, match=why) as e:
    predictions.read(d, REQUIRED)
  msg = str(e.value)
  assert (
    "\n" not in msg and predictions.FILE in msg and "delete it" in msg and "ban_tf.report" in msg
  )


def test_missing_file_is_a_usage_error(tmp_path):
  with pytest.raises(errors.UsageError, match="missing"):
    predictions.read(str(tmp_path))


# ---- language-model sentences ------------------------------------------------------------------------


@pytest.mark.parametrize("state,batch", [("carry", 3), ("reset", 3), ("reset", 2)])
def test_lm_sentence_ids_follow_the_evaluation_order(tmp_path, state, batch):
  """Every test line's words are its own (t{j}w{k}, also in train so they have ids), so a
  scored token's word names its line: an independent check of eval_sentences against the
  labels the evaluation pipeline itself yields."""
  from ban_tf import text_data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  test = [[f"t{j}w{k}" for k in range(int(rng.integers(2, 6)))] for j in range(9)]
  with open(tmp_path / "ptb.test.txt", "w") as f:
    f.writelines(" ".join(line) + "\n" for line in test)
  with open(tmp_path / "ptb.train.txt", "w") as f:
    f.writelines(" ".join(line) + "\n" for line in test * 2)
  with open(tmp_path / "ptb.valid.txt", "w") as f:
    f.write("t0w0 t0w1\n")
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=4, state=state)
  vocab = ds.info.vocab
  labels = np.concatenate([y.numpy().reshape(-1) for _, y in ds.test(batch)])
  sentence = ds.eval_sentences("test", batch)
  assert sentence.shape == labels.shape and sentence.dtype == np.int32
  words = [vocab[i] for i in labels]
  assert text_data.UNK not in words
  checked = 0
  for w, s in zip(words, sentence):
    if w != text_data.EOS:
      assert s == int(w[1 : w.index("w")]), (w, s)  # the line the word belongs to
      checked += 1
  n_scored = sum(len(line) + 1 for line in test) if state == "carry" else None
  if n_scored:
    assert len(labels) == n_scored  # carry: every token of the split, once
  assert checked > 0.6 * len(words)


# ---- tables ---------------------------------------------------------------------------------------------


def _cmp(delta, lo, hi, p, verdict):
  return {"delta": delta, "ci95": [lo, hi], "p": p, "n": 100, "method": "m", "verdict": verdict}


def test_table_shows_paired_columns_and_blank_reference_cells():
  res = {
    "generations": [
      {"gen": 0, "arch": "tiny", "params": 10, "test_error": 0.2},
      {
        "gen": 1,
        "arch": "tiny",
        "params": 10,
        "test_error": 0.15,
        "vs_teacher": _cmp(-5.0, -7.25, -2.5, 0.0004, "better"),
      },
    ],
    "ensembles": [],
    "baseline": None,
  }
  from ban_tf.tasks import image  # pylint: disable=g-import-not-at-top

  text = results_lib.table(res, image.TEST_ERROR)
  assert "| Δ vs teacher [95% CI] | p | vs teacher |" in text
  assert "| BAN-1 | tiny | 0.0k | 15.00 | -5.00 [-7.25, -2.50] | <0.001 | better |" in text
  assert "| Teacher | tiny | 0.0k | 20.00 |  |  |  |" in text
  assert "vs baseline" not in text  # no row has one


def test_seed_table_shows_a_shared_teacher_as_one_model_never_zero_spread():
  from ban_tf.tasks import image  # pylint: disable=g-import-not-at-top

  runs = []
  for err in (0.10, 0.14):
    runs.append(
      {
        "generations": [
          {"gen": 0, "arch": "tiny", "params": 10, "test_error": 0.2},
          {
            "gen": 1,
            "arch": "tiny",
            "params": 10,
            "test_error": err,
            "vs_teacher": _cmp(100 * err - 20, -1, 1, 0.5, "x"),
          },
        ],
        "ensembles": [],
        "baseline": None,
      }
    )
  agg = results_lib.aggregate(runs, image.TEST_ERROR)
  assert agg[1]["deltas_vs_teacher"] == pytest.approx([-10.0, -6.0])
  agg[0]["shared"] = True
  agg[1]["vs_teacher"] = stats.over_seeds(agg[1]["deltas_vs_teacher"], includes="x").to_json()
  text = results_lib.aggregate_table(agg, image.TEST_ERROR)
  assert "± 0.00" not in text
  assert "| Teacher | tiny | 0.0k | 20.00 (one model, shared by 2 runs) |" in text
  lo, hi = agg[1]["vs_teacher"]["ci95"]
  assert f"-8.00 [{lo:+.2f}, {hi:+.2f}]" in text


def test_teacher_sharing_from_gen0_sources(tmp_path):
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  def runs(shas):
    out = []
    for i, sha in enumerate(shas):
      d = tmp_path / f"{len(shas)}-{'-'.join(map(str, shas))}-{i}"
      (d / "gen_0").mkdir(parents=True)
      m = {"gen": 0} if sha is None else {"gen": 0, "source": {"sha256": sha}}
      (d / "gen_0" / "metrics.json").write_text(json.dumps(m))
      out.append(report.Run(str(d), {}, {}, {}))
    return out

  shared, text = report.teacher_sharing(runs(["a", "a", "a"]))
  assert shared and "one fixed teacher shared by all 3" in text and "not the teacher's" in text
  shared, text = report.teacher_sharing(runs(["a", "b"]))
  assert not shared and "imported its own teacher" in text
  shared, text = report.teacher_sharing(runs([None, None]))
  assert not shared and "trained its own teacher" in text


# ---- tiny runs: what a run stores and reports ------------------------------------------------------------

_IMAGE = [
  "--task=image",
  "--dataset=fashion_mnist",
  f"--data_dir={SHARED_TFDS}",
  "--arch=tiny",
  "--train_examples=200",
  "--val_examples=50",  # neither split size divides the batch (24) nor the replicas
  "--test_split=test[:100]",
  "--batch_size=24",
  "--lr=0.05",
  "--epochs=1",
  "--gens=1",
  "--baseline",
  "--verbose=0",
]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
  if not os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist")):
    pytest.skip("no shared fashion_mnist")
  d = str(tmp_path_factory.mktemp("img") / "r1")
  assert run_main_once(_IMAGE + [f"--run_dir={d}"]) == 0
  return d


_MODELS = {"Teacher": "gen_0", "BAN-1": "gen_1", "Baseline": "baseline"}
_rows = e2e_runs.rows


@pytest.mark.slow
def test_image_outputs_reproduce_the_reported_errors(image_run, tmp_path):
  """One replica here; on two (and a replica's empty share of the last batch):
  multireplica_test.py::test_run_exports_what_it_reports[2-2], with the same checks.

  What the run stored also equals the SavedModels' outputs recomputed here (on one device
  with the default strategy)."""
  e2e_runs.assert_image_outputs(image_run, _MODELS, n_test=100, n_val=50)
  e2e_runs.assert_outputs_equal_a_recomputation(image_run, _MODELS.values(), str(tmp_path))


@pytest.mark.slow
def test_image_rows_carry_paired_comparisons(image_run):
  from ban_tf import tasks  # pylint: disable=g-import-not-at-top

  run_dir = image_run
  rows = _rows(run_dir)
  assert "vs_teacher" not in rows["Teacher"] and "vs_baseline" not in rows["Baseline"]
  out = {k: predictions.read(os.path.join(run_dir, n))["test"] for k, n in _MODELS.items()}
  correct = {k: o["predicted"] == o["labels"] for k, o in out.items()}
  for key, field, ref in (
    ("BAN-1", "vs_teacher", "Teacher"),
    ("Baseline", "vs_teacher", "Teacher"),
    ("BAN-1", "vs_baseline", "Baseline"),
  ):
    got = rows[key][field]
    assert got == stats.paired_classification(correct[key], correct[ref]).to_json()
    assert got["n"] == 100 and got["unit"] == "examples"
    assert got["delta"] == pytest.approx(100 * (rows[key]["test_error"] - rows[ref]["test_error"]))
    assert got["ci95"][0] <= got["delta"] <= got["ci95"][1]
    assert got["verdict"] == stats.verdict(got["ci95"])
  md = open(os.path.join(run_dir, "results.md")).read()
  assert "Δ vs teacher [95% CI]" in md and "Δ vs baseline [95% CI]" in md
  assert stats.LEGEND in md
  assert (
    tasks.get("image").compare(out["BAN-1"], out["Teacher"]).to_json()
    == rows["BAN-1"]["vs_teacher"]
  )


def _strip_outputs(run_dir):
  """Makes `run_dir` look like a run made before outputs were stored."""
  entries = manifest.read(run_dir)
  for name, entry in entries.items():
    entry.pop("predictions_sha256", None)
    manifest.record(run_dir, name, **entry)
  for name in _MODELS.values():
    os.remove(predictions.path(os.path.join(run_dir, name)))
  res = json.load(open(os.path.join(run_dir, "results.json")))
  for r in results_lib.rows(res):
    r.entry.pop("vs_teacher", None)
    r.entry.pop("vs_baseline", None)
  json.dump(res, open(os.path.join(run_dir, "results.json"), "w"))


@pytest.mark.slow
def test_report_computes_missing_outputs_of_an_old_run(image_run, tmp_path):
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / "old")
  shutil.copytree(image_run, run_dir)
  before = _rows(image_run)
  _strip_outputs(run_dir)
  assert "vs_teacher" not in _rows(run_dir)["BAN-1"]
  report.write_report(run_dir, hparams=False)
  for name in _MODELS.values():
    new = predictions.read(os.path.join(run_dir, name))
    old = predictions.read(os.path.join(image_run, name))
    for split in ("test", "val"):
      for k in old[split]:
        np.testing.assert_array_equal(new[split][k], old[split][k])
    assert "predictions_sha256" in manifest.read(run_dir)[name]
  after = _rows(run_dir)
  assert after["BAN-1"]["vs_teacher"] == before["BAN-1"]["vs_teacher"]
  assert after["BAN-1"]["vs_baseline"] == before["BAN-1"]["vs_baseline"]


@pytest.mark.slow
def test_evaluate_computes_missing_outputs(image_run, tmp_path):
  from ban_tf import evaluate  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / "old")
  shutil.copytree(image_run, run_dir)
  _strip_outputs(run_dir)
  got = evaluate.evaluate_run(run_dir)
  assert sorted(got["predictions_computed"]) == ["baseline", "gen_0", "gen_1"]
  assert all(predictions.exists(os.path.join(run_dir, n)) for n in _MODELS.values())
  assert evaluate.evaluate_run(run_dir)["predictions_computed"] == []  # once


@pytest.mark.slow
def test_damaged_or_replaced_outputs_stop_the_report(image_run, tmp_path):
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  run_dir = str(tmp_path / "bad")
  shutil.copytree(image_run, run_dir)
  p = predictions.path(os.path.join(run_dir, "gen_1"))
  data = open(p, "rb").read()
  open(p, "wb").write(data[: len(data) // 2])
  with pytest.raises(errors.UsageError, match="not the file this run recorded") as e:
    report.write_report(run_dir, hparams=False)
  assert "delete it" in str(e.value)
  # Without a manifest record (a run whose outputs were computed elsewhere): the read says why.
  entry = manifest.read(run_dir)["gen_1"]
  entry.pop("predictions_sha256")
  manifest.record(run_dir, "gen_1", **entry)
  with pytest.raises(errors.UsageError, match="is damaged"):
    report.write_report(run_dir, hparams=False)


# ---- language model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  """lm_e2e_test's run (e2e_runs.lm_run: Teacher, BAN-1, BAN-2, BANE-2), trained once."""
  return e2e_runs.lm_run(tmp_path_factory)[1]


@pytest.mark.slow
def test_lm_outputs_reproduce_the_reported_perplexity(lm_run):
  from ban_tf import tasks  # pylint: disable=g-import-not-at-top

  task = tasks.get("lm")
  rows = _rows(lm_run)
  for key, name in (("Teacher", "gen_0"), ("BAN-1", "gen_1"), ("BANE-2", "ensemble_2")):
    out = predictions.read(os.path.join(lm_run, name), task.prediction_arrays)
    for split in ("test", "val"):
      o = out[split]
      assert o["nll"].dtype == np.float32 and o["sentence"].dtype == np.int32
      # Every token of the split scored once (carry: one stream); sentences = corpus lines.
      assert o["sentence"][0] == 0 and np.all(np.diff(o["sentence"]) >= 0)
      lines = e2e_runs.LM_LINES["test" if split == "test" else "valid"]
      assert o["sentence"][-1] + 1 == lines
      ppl = math.exp(float(np.mean(o["nll"], dtype=np.float64)))
      assert ppl == pytest.approx(rows[key][f"{split}_perplexity"], rel=1e-5)
  v = rows["BAN-1"]["vs_teacher"]
  assert v["unit"] == "tokens" and v["p"] is not None
  assert v["detail"] == f"{e2e_runs.LM_LINES['test']} sentences"
  t = predictions.read(os.path.join(lm_run, "gen_0"))["test"]
  b = predictions.read(os.path.join(lm_run, "gen_1"))["test"]
  assert v == stats.paired_lm(b["nll"], t["nll"], t["sentence"]).to_json()
  assert v["delta"] == pytest.approx(
    rows["BAN-1"]["test_perplexity"] - rows["Teacher"]["test_perplexity"], rel=1e-4
  )
  assert "vs_teacher" in rows["BANE-2"]
