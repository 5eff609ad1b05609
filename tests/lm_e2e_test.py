"""End to end: main.run on a tiny PTB-format corpus, teacher + 2 BAN+L generations.

Checks the disk contract and recomputes every reported perplexity with NumPy from the
saved models on the Zaremba evaluation layout.
"""

import json
import os

import keras
import numpy as np
import pytest

from ban_tf import config
from ban_tf import export
from ban_tf import schedules
from ban_tf.tasks import lm
from ban_tf import main
from ban_tf import text_data
from ban_tf import teacher as teacher_lib

pytestmark = pytest.mark.slow  # end to end: trains and exports (pytest -m "not slow" skips it)

_WORDS = "the cat dog sat on mat a big small red ran fast slow house tree".split()


def _corpus(directory, seed=0):
  rng = np.random.RandomState(seed)
  for name, lines in (("train", 300), ("valid", 50), ("test", 50)):
    with open(os.path.join(directory, f"ptb.{name}.txt"), "w") as f:
      for _ in range(lines):
        # A little structure to learn: "the" is followed by a noun.
        words = [str(w) for w in rng.choice(_WORDS, rng.randint(3, 9))]
        words = [w if i == 0 or words[i - 1] != "the" else "cat" for i, w in enumerate(words)]
        f.write(" " + " ".join(words) + " \n")


def _numpy_perplexity(models, ids, batch, bptt, state="carry"):
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


def test_two_generations_and_ensemble(tmp_path):
  _corpus(str(tmp_path))
  run_dir = str(tmp_path / "run")
  cfg = config.Config(
    task="lm",
    dataset="ptb",
    ptb_dir=str(tmp_path),
    arch="lstm-1-16",
    gens=2,
    epochs=3,
    batch_size=4,
    bptt=6,
    lr=1.0,
    momentum=0.0,
    nesterov=False,
    weight_decay=0.0,
    clip_norm=5.0,
    loss="ban_l",
    lr_plateau_decay=0.25,
    run_dir=run_dir,
    verbose="0",
    lr_plateau_min_delta=1000.0,
  )  # only epoch 1 improves (on inf): the rate decays after every later epoch
  results = main.run(cfg)
  data = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=6)
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
      want = _numpy_perplexity([model], data.ids[split], 4, 6)
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
    ens["test_perplexity"], _numpy_perplexity(members[1:], data.ids["test"], 4, 6), rtol=1e-4
  )
  np.testing.assert_allclose(
    saved["ensembles"][0]["val_perplexity"],
    _numpy_perplexity(members[1:], data.ids["val"], 4, 6),
    rtol=1e-4,
  )
  assert results["ensembles"][0]["name"] == "BANE-2"
