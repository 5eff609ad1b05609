"""End to end: main.run on a tiny PTB-format corpus, teacher + 2 BAN+L generations.

Checks the disk contract and recomputes every reported perplexity with NumPy from the
saved models on the Zaremba evaluation layout. The run (e2e_runs.lm_run) is trained once per
test process: predictions_test reads it too.
"""

import json
import os

import keras
import numpy as np
import pytest

from ban_tf import export
from ban_tf import schedules
from ban_tf.tasks import lm
from ban_tf import text_data
from ban_tf import teacher as teacher_lib
from tests import e2e_runs

pytestmark = pytest.mark.slow  # end to end: trains and exports (pytest -m "not slow" skips it)

_numpy_perplexity = e2e_runs.numpy_perplexity


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  return e2e_runs.lm_run(tmp_path_factory)  # shared with predictions_test


def test_two_generations_and_ensemble(lm_run):
  ptb_dir, run_dir, results = lm_run
  batch, bptt = e2e_runs.LM_BATCH, e2e_runs.LM_BPTT
  data = text_data.TextDataset("ptb", ptb_dir=ptb_dir, bptt=bptt)
  vocab = data.info.vocab
  saved = json.load(open(os.path.join(run_dir, "results.json")))
  assert [g["gen"] for g in saved["generations"]] == [0, 1, 2]
  assert "Test perplexity" in open(os.path.join(run_dir, "results.md")).read()
  members = []
  for gen in range(3):
    gdir = os.path.join(run_dir, f"gen_{gen}")
    for name in ("saved_model", "model.keras", "metrics.json", "history.json", "DONE"):
      assert os.path.exists(os.path.join(gdir, name)), name
    assert os.path.isdir(
      os.path.join(run_dir, "tb", "Teacher" if gen == 0 else f"BAN-{gen}")
    )  # rundir.tensorboard_dir
    assert lm.read_vocab(gdir) == vocab
    metrics = export.read_json(os.path.join(gdir, "metrics.json"))
    model = keras.saving.load_model(os.path.join(gdir, "model.keras"), compile=False)
    assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {
      "keras"
    }  # Task.stock_model
    members.append(model)
    for split, key in (("val", "val_perplexity"), ("test", "test_perplexity")):
      want = _numpy_perplexity([model], data.ids[split], batch, bptt)
      np.testing.assert_allclose(metrics[key], want, rtol=1e-4)
      np.testing.assert_allclose(saved["generations"][gen][key], want, rtol=1e-4)
    assert 1.0 < metrics["test_perplexity"] < len(vocab)  # learned something
    # The SavedModel (the next teacher) maps ids [N, T] to the same logits [N, T, V].
    teacher = teacher_lib.Teacher.load(
      os.path.join(gdir, "saved_model"), expected_classes=len(vocab)
    )
    x = data.ids["test"][:20].reshape(2, 10)
    np.testing.assert_allclose(teacher(x).logits.numpy(), model(x).numpy(), atol=1e-5)
    history = export.read_json(os.path.join(gdir, "history.json"))
    ppls = [h["val_perplexity"] for h in history]
    for e, h in enumerate(history):  # the plateau schedule, replayed from val perplexity
      assert (
        h["learning_rate"]
        == schedules.plateau_lr(1.0, ppls[:e], 0.25, 1000.0)
        == 0.25 ** max(0, e - 1)
      )
    if gen > 0:
      assert metrics["objective"]["loss"] == "ban_l" and history[0]["kd_loss"] > 0
      assert "teacher_agreement" in history[0]
  ens = export.read_json(os.path.join(run_dir, "ensemble_2", "metrics.json"))
  assert ens["members"] == [1, 2]
  np.testing.assert_allclose(
    ens["test_perplexity"], _numpy_perplexity(members[1:], data.ids["test"], batch, bptt), rtol=1e-4
  )
  np.testing.assert_allclose(
    saved["ensembles"][0]["val_perplexity"],
    _numpy_perplexity(members[1:], data.ids["val"], batch, bptt),
    rtol=1e-4,
  )
  assert results["ensembles"][0]["name"] == "BANE-2"
