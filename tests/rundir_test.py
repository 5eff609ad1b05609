"""The persistence layer (rundir.py) on fabricated run directories: no training.

Sealing order and the manifest, damaged and swapped files refused before anything is
written, checkpoint fallback and repair, history cut back (or refused) on resume, and
result collection taking the manifest as the truth of what is finished. The run
directories come from tests/fabricate.py, written by the same ModelDir.seal as real runs.
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from ban_tf import errors
from ban_tf import export
from ban_tf import generations
from ban_tf import manifest
from ban_tf import rundir
from ban_tf import tasks
from tests import fabricate


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  return fabricate.finished_run(str(tmp_path_factory.mktemp("finished") / "run"), gens=2)


@pytest.fixture
def run_copy(finished, tmp_path):
  path = str(tmp_path / "run")
  shutil.copytree(finished, path)
  return path


def _snapshot(path):
  out = {}
  for parent, _, files in os.walk(path):
    for name in files:
      if name != ".lock":
        with open(os.path.join(parent, name), "rb") as f:
          out[os.path.relpath(os.path.join(parent, name), path)] = f.read()
  return out


def _rows(results):
  return [r["gen"] for r in results["generations"]], [r["name"] for r in results["ensembles"]]


# ---- sealing ------------------------------------------------------------------------


def test_fabricated_run_is_finished_and_bound_to_its_manifest(finished):
  run = rundir.RunFiles(finished)
  entries = manifest.read(finished)
  assert sorted(entries) == ["ensemble_2", "gen_0", "gen_1", "gen_2"]
  assert run.finished_gens() == [0, 1, 2] and run.finished_ensembles() == [2]
  for k in (0, 1, 2):
    g = run.generation(k)
    assert g.check(keras=True)
    assert entries[g.name]["keras_sha256"] == manifest.file_digest(g.read_keras)
    assert g.read_metrics()["gen"] == k
  assert _rows(json.load(open(run.results_path))) == ([0, 1, 2], ["BANE-2"])


def test_seal_writes_model_then_metrics_then_manifest_then_done(tmp_path, monkeypatch):
  """The one sealing order; a failure before DONE leaves a model that is not finished."""
  calls = []
  for owner, name in (
    (export, "export_saved_model"),
    (export, "save_keras"),
    (export, "write_json"),
    (manifest, "record"),
    (export, "touch_done"),
  ):
    real = getattr(owner, name)
    monkeypatch.setattr(
      owner,
      name,
      lambda *a, _real=real, _name=name, **kw: calls.append((_name, a)) or _real(*a, **kw),
    )
  g = rundir.ModelDir.at(str(tmp_path / "gen_0"))
  os.makedirs(os.path.join(g.path, "ckpt"))
  result = fabricate.fake_metrics(0, 0.5)
  extra = [("outputs.npy", lambda p: np.save(open(p, "wb"), np.arange(3)))]
  g.seal(
    tasks.get("image"),
    fabricate.SPEC,
    result,
    model=fabricate.tiny_model(0),
    keras_model=fabricate.tiny_model(0),
    measure=lambda sm: {"measured_on": os.path.basename(sm)},
    extra_files=extra,
    record={"weights_sha256": "w"},
  )
  order = [n for n, _ in calls]
  assert order == ["export_saved_model", "save_keras", "write_json", "record", "touch_done"]
  assert calls[2][1][1] == os.path.join(g.path, "metrics.json")
  assert json.load(open(g.metrics_path))["measured_on"] == "saved_model"  # measured before metrics
  entry = manifest.read(str(tmp_path))["gen_0"]
  assert entry["weights_sha256"] == "w" and set(entry["files_sha256"]) == {"outputs.npy"}
  assert g.is_finished and not os.path.exists(os.path.join(g.path, "ckpt"))
  assert g.check(keras=True)
  # The extra file is checked like the rest.
  np.save(os.path.join(g.path, "outputs.npy"), np.arange(4))
  with pytest.raises(errors.TeacherError, match="outputs.npy is missing or not the file this run"):
    g.check()

  def fails(_):
    raise KeyboardInterrupt("killed while measuring")

  g1 = rundir.ModelDir.at(str(tmp_path / "gen_1"))
  with pytest.raises(KeyboardInterrupt):
    g1.seal(tasks.get("image"), fabricate.SPEC, {}, model=fabricate.tiny_model(1), measure=fails)
  assert os.path.isdir(g1.saved_model) and not g1.is_done and not os.path.exists(g1.metrics_path)
  assert "gen_1" not in manifest.read(str(tmp_path))


# ---- damaged and swapped files: refused on open, nothing written -----------------------


def _swap_gen0_saved_model(run):  # the fingerprint file travels with the directory
  shutil.rmtree(os.path.join(run, "gen_0", "saved_model"))
  shutil.copytree(
    os.path.join(run, "gen_1", "saved_model"), os.path.join(run, "gen_0", "saved_model")
  )


def _swap_gen1_keras(run):
  shutil.copy(os.path.join(run, "gen_2", "model.keras"), os.path.join(run, "gen_1", "model.keras"))


def _truncate_gen1_keras(run):
  path = os.path.join(run, "gen_1", "model.keras")
  os.truncate(path, os.path.getsize(path) // 3)


def _write(rel, data):
  def damage(run):
    with open(os.path.join(run, rel), "wb") as f:
      f.write(data)

  return damage


RANDOM = bytes((i * 97 + 13) % 256 for i in range(300))


@pytest.mark.parametrize(
  "damage,error,needles",
  [
    (
      _swap_gen0_saved_model,
      errors.TeacherError,
      ["gen_0/saved_model is not the model this run recorded for gen_0", "manifest.json"],
    ),
    (_swap_gen1_keras, errors.TeacherError, ["gen_1/model.keras is not the model.keras this run"]),
    (
      _truncate_gen1_keras,
      errors.TeacherError,
      ["gen_1/model.keras is not the model.keras this run"],
    ),
    (
      _write("gen_1/metrics.json", b'{"gen": 1, "test_'),
      errors.RunDirError,
      ["gen_1/metrics.json is damaged (JSONDecodeError", "delete gen_1/"],
    ),
    (_write("config.json", RANDOM), errors.RunDirError, ["config.json is damaged", "--overwrite"]),
    (
      _write("config.json", b"[1, 2, 3]\n"),
      errors.RunDirError,
      ["config.json is damaged (a JSON list, not an object)"],
    ),
    (_write("manifest.json", b"{}"), errors.RunDirError, ["manifest.json is damaged"]),
    (
      _write("manifest.json", b'{"entries": [1]}'),
      errors.RunDirError,
      ["manifest.json is damaged", "delete it to re-record"],
    ),
  ],
  ids=[
    "swap_gen0_saved_model",
    "swap_gen1_keras",
    "truncated_gen1_keras",
    "gen1_metrics_json",
    "config_random_bytes",
    "config_json_list",
    "manifest_empty_object",
    "manifest_entries_not_a_mapping",
  ],
)
def test_damaged_finished_run_is_refused_on_open_and_changes_nothing(
  run_copy, damage, error, needles
):
  damage(run_copy)
  before = _snapshot(run_copy)
  with pytest.raises(error) as e:
    rundir.RunDir(run_copy, fabricate.config(gens=3), spec=fabricate.SPEC).open()
  for needle in needles:
    assert needle in str(e.value), str(e.value)
  assert "\n" not in str(e.value)
  assert _snapshot(run_copy) == before


def test_damaged_ensemble_is_marked_stale_not_refused(run_copy, caplog):
  _write("ensemble_2/metrics.json", b"not json")(run_copy)
  with caplog.at_level(logging.WARNING, logger="absl"):
    with rundir.RunDir(run_copy, fabricate.config(), spec=fabricate.SPEC) as run:
      assert run.stale_ensembles == {2}
      results = generations.collect_results(run)
  assert "rebuilding BANE-2" in caplog.text
  ens = results["ensembles"][0]
  assert ens["test_accuracy"] == 0.8 and "not finished on disk" in ens["damaged"]


# ---- the manifest is the truth of what is finished -----------------------------------


def _copy_gen2_as_gen3(run):
  shutil.copytree(os.path.join(run, "gen_2"), os.path.join(run, "gen_3"))


def test_copied_generation_beyond_gens_is_no_second_row(run_copy, caplog):
  """gen_3/ copied from gen_2/ (DONE, not in the manifest) became a second BAN-2 row."""
  _copy_gen2_as_gen3(run_copy)
  with caplog.at_level(logging.WARNING, logger="absl"):
    with rundir.RunDir(run_copy, fabricate.config(gens=2), spec=fabricate.SPEC) as run:
      assert run.finished_gens() == [0, 1, 2]
      results = generations.collect_results(run)
  assert _rows(results) == ([0, 1, 2], ["BANE-2"])
  assert "gen_3 is marked DONE but not recorded" in caplog.text
  assert "gen_3" not in manifest.read(run_copy)


def test_copied_generation_within_gens_is_refused(run_copy):
  _copy_gen2_as_gen3(run_copy)
  before = _snapshot(run_copy)
  with pytest.raises(errors.RunDirError, match="gen_3 is marked DONE but this run never recorded"):
    rundir.RunDir(run_copy, fabricate.config(gens=3), spec=fabricate.SPEC).open()
  assert _snapshot(run_copy) == before


def test_copy_with_its_own_metrics_is_known_by_its_fingerprint(run_copy):
  _copy_gen2_as_gen3(run_copy)
  metrics = os.path.join(run_copy, "gen_3", "metrics.json")
  export.write_json(dict(json.load(open(metrics)), gen=3), metrics)
  with pytest.raises(errors.RunDirError, match=r"its SavedModel is gen_2's"):
    rundir.RunDir(run_copy, fabricate.config(gens=3), spec=fabricate.SPEC).open()


def test_run_written_before_manifests_is_adopted_whole(run_copy, caplog):
  """Every DONE model of a run without manifest.json is recorded on open (beyond --gens too),
  so a smaller --gens keeps every row."""
  os.remove(os.path.join(run_copy, "manifest.json"))
  with caplog.at_level(logging.WARNING, logger="absl"):
    with rundir.RunDir(run_copy, fabricate.config(gens=1), spec=fabricate.SPEC) as run:
      results = generations.collect_results(run)
  assert sorted(manifest.read(run_copy)) == ["ensemble_2", "gen_0", "gen_1", "gen_2"]
  assert "written before manifests" in caplog.text
  assert _rows(results) == ([0, 1, 2], ["BANE-2"])
  assert not any(r.get("damaged") for r in results["generations"])


# ---- checkpoints: fallback and repair ------------------------------------------------


@pytest.fixture
def partial(tmp_path):
  g = rundir.ModelDir.at(str(tmp_path / "gen_0"))
  fabricate.partial_generation(g, epochs=3)  # keeps ckpt-2 and ckpt-3
  return g


def _ckpt(g):
  return os.path.join(g.path, "ckpt")


def _truncate_newest_data(g):
  path = os.path.join(_ckpt(g), "ckpt-3.data-00000-of-00001")
  os.truncate(path, os.path.getsize(path) // 3)


def _empty_newest_index(g):
  os.truncate(os.path.join(_ckpt(g), "ckpt-3.index"), 0)


def _delete_newest(g):  # the `checkpoint` index still names it
  for name in os.listdir(_ckpt(g)):
    if name.startswith("ckpt-3."):
      os.remove(os.path.join(_ckpt(g), name))


def _garble_index(g):  # the index file itself: files are found without it
  with open(os.path.join(_ckpt(g), "checkpoint"), "w") as f:
    f.write("model_checkpoint_path: {{{ garbage")
  _delete_newest(g)


@pytest.mark.parametrize(
  "damage,why",
  [
    (_truncate_newest_data, "gen_0/ckpt/ckpt-3 is unreadable"),
    (_empty_newest_index, "gen_0/ckpt/ckpt-3 is unreadable"),
    (_delete_newest, "gen_0/ckpt/ckpt-3 is missing (its index entry is dangling)"),
    (_garble_index, "gen_0/ckpt/checkpoint is damaged"),
  ],
  ids=["truncated_data", "empty_index", "deleted", "garbled_index"],
)
def test_unreadable_newest_checkpoint_falls_back_and_is_repaired(partial, caplog, damage, why):
  damage(partial)
  ckpt, epoch, model = fabricate.checkpoint(seed=5)
  with caplog.at_level(logging.WARNING, logger="absl"):
    latest = partial.restore(ckpt, label="gen 0")
  assert os.path.basename(latest) == "ckpt-2" and int(epoch.numpy()) == 2
  assert why in caplog.text
  # The weights are epoch 2's: fabricate adds e to every weight in epoch e.
  want = fabricate.tiny_model(0)
  for a, b in zip(model.weights, want.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy() + 3.0)
  # Repaired: the index names only ckpt-2, and ckpt-3's files are gone.
  index = open(os.path.join(_ckpt(partial), "checkpoint")).read()
  assert 'model_checkpoint_path: "ckpt-2"' in index and "ckpt-3" not in index
  assert not [f for f in os.listdir(_ckpt(partial)) if f.startswith("ckpt-3")]
  assert tf.train.latest_checkpoint(_ckpt(partial)).endswith("ckpt-2")
  assert [h["epoch"] for h in partial.history(2)] == [1, 2]  # epoch 3's entry is cut


def test_reader_copy_is_not_repaired(partial, tmp_path):
  """A multi-worker non-chief (reads the chief's directory, writes its own) repairs nothing."""
  _truncate_newest_data(partial)
  before = _snapshot(_ckpt(partial))
  reader = rundir.ModelDir.at(str(tmp_path / "private" / "gen_0"), read=partial.path)
  ckpt, _, _ = fabricate.checkpoint()
  assert os.path.basename(reader.restore(ckpt, label="gen 0")) == "ckpt-2"
  assert _snapshot(_ckpt(partial)) == before


def test_no_checkpoint_is_a_fresh_start(tmp_path):
  g = rundir.ModelDir.at(str(tmp_path / "gen_1"))
  assert g.restore(fabricate.checkpoint()[0], label="gen 1") is None


@pytest.mark.parametrize(
  "damage,needles",
  [
    (
      lambda g: [
        _empty_newest_index(g),
        os.truncate(os.path.join(_ckpt(g), "ckpt-2.index"), 0),
      ],
      [
        "gen_0/ckpt holds no readable checkpoint",
        "ckpt-3 is unreadable",
        "ckpt-2 is unreadable",
        "retrain this generation from epoch 0",
      ],
    ),
  ],
  ids=["no_readable_checkpoint"],
)
def test_unrecoverable_checkpoints_are_one_line(partial, damage, needles):
  damage(partial)
  with pytest.raises(errors.RunDirError) as e:
    partial.restore(fabricate.checkpoint()[0], label="gen 0")
  for needle in needles:
    assert needle in str(e.value)


@pytest.mark.parametrize(
  "data,needles",
  [
    (b"[{]", ["gen_0/history.json is damaged (JSONDecodeError", "retrain this generation from"]),
    (b'{"epoch": 1}', ["gen_0/history.json is damaged (a JSON dict, not a list)"]),
    (b'[{"loss": 1}]', ["gen_0/history.json is damaged (entries without an epoch)"]),
    (b'[{"epoch": 1}, {"epoch": 3}]', ["gen_0/history.json lacks epochs 2", "holds epochs 1..3"]),
    (None, ["gen_0/history.json is missing", "holds epochs 1..3", "restore it"]),
  ],
  ids=["invalid_json", "not_a_list", "no_epoch", "lacks_an_epoch", "deleted"],
)
def test_history_that_cannot_cover_the_checkpoint_is_refused(partial, data, needles):
  """A deleted (or cut) history.json used to resume silently without those epochs' rows."""
  if data is None:
    os.remove(partial.history_path)
  else:
    with open(partial.history_path, "wb") as f:
      f.write(data)
  ckpt, epoch, _ = fabricate.checkpoint()
  partial.restore(ckpt, label="gen 0")
  with pytest.raises(errors.RunDirError) as e:
    partial.history(int(epoch.numpy()))
  for needle in needles:
    assert needle in str(e.value), str(e.value)


def test_history_is_cut_back_to_the_checkpoint(partial):
  """Entries after the restored epoch (written before a save that never happened) are dropped."""
  export.write_json(
    [{"epoch": e, "loss": 1.0} for e in (1, 2, 3, 4)], os.path.join(partial.path, "history.json")
  )
  assert [h["epoch"] for h in partial.history(3)] == [1, 2, 3]
  assert partial.history(0) == []


# ---- per-example outputs whose place is taken by a directory ----------------------


def _store_outputs(run, gen):
  """gen_<gen>/predictions.npz of 6 fabricated test examples, recorded in the manifest."""
  from ban_tf import predictions  # pylint: disable=g-import-not-at-top

  d = os.path.join(run, f"gen_{gen}")
  predicted = np.arange(6, dtype=np.int32) % fabricate.NUM_CLASSES
  predicted[:gen] = 0  # each generation right on a different set
  test = {
    "probabilities": np.eye(fabricate.NUM_CLASSES, dtype=np.float16)[predicted],
    "labels": np.arange(6, dtype=np.int32) % fabricate.NUM_CLASSES,
    "predicted": predicted,
  }
  predictions.write(d, {"test": test}, task="image")
  manifest.add_predictions(run, f"gen_{gen}", d)
  return d


def test_outputs_file_that_is_a_directory_is_one_line_on_read_and_write(run_copy):
  """A predictions.npz that is a directory (damaged or hostile run directory): one line naming
  it and the fix (remove it), on the report's read path (it used to be hashed and reported as
  a write error, "cannot write ...: make it writable") and on every write path (before a
  model trains; nothing half-written)."""
  from ban_tf import predictions  # pylint: disable=g-import-not-at-top
  from ban_tf import report  # pylint: disable=g-import-not-at-top

  for gen in (0, 1):
    d = _store_outputs(run_copy, gen)
  report.write_report(run_copy, hparams=False)  # whole: the report reads them
  os.remove(predictions.path(d))
  os.makedirs(os.path.join(predictions.path(d), "junk"))
  before = _snapshot(run_copy)
  fix = rf"{predictions.path(d)} is a directory .*: remove it \(rm -r {predictions.path(d)}\)"
  with pytest.raises(errors.RunDirError, match=fix) as err:
    report.write_report(run_copy, hparams=False)
  assert "\n" not in str(err.value) and "cannot write" not in str(err.value)
  with pytest.raises(errors.RunDirError, match=fix):
    predictions.read(d)
  with pytest.raises(errors.RunDirError, match=fix):
    predictions.write(d, {"test": {"labels": np.zeros(2, np.int32)}}, task="image")
  with pytest.raises(errors.RunDirError, match=fix):  # a generation about to train
    rundir.RunFiles(run_copy).generation(1).make()
  assert _snapshot(run_copy) == before  # nothing written, no temporary file left
  assert os.listdir(predictions.path(d)) == ["junk"]
