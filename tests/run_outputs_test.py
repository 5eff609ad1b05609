"""What a real (tiny) run leaves for users: report, TensorBoard events, SavedModels that
ban_tf.evaluate reloads in a fresh process, and labels for classifying image files.

The run is conftest's finished_image_run (IMAGE_ARGS + --gens=2: tiny model, 2
generations, 3 epochs), trained once per test process and shared with the other files.
"""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea

from ban_tf import errors
from ban_tf import evaluate
from ban_tf import export
from tests.conftest import IMAGE_ARGS
from tests.conftest import REPO
from tests.conftest import SHARED_TFDS

pytestmark = pytest.mark.slow  # end to end: trains and exports (pytest -m "not slow" skips it)

EPOCHS = int(next(a for a in IMAGE_ARGS if a.startswith("--epochs=")).split("=")[1])
GENS = 2


@pytest.fixture
def run_dir(finished_image_run):
  """The finished run (read only)."""
  return finished_image_run


def _python(*args):
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_run_ends_with_its_report(run_dir):
  png = os.path.join(run_dir, "report.png")
  assert os.path.getsize(png) > 10000
  with Image.open(png) as im:
    assert im.format == "PNG"
  md = open(os.path.join(run_dir, "results.md")).read()
  results = export.read_json(os.path.join(run_dir, "results.json"))
  for g in results["generations"]:
    name = "Teacher" if g["gen"] == 0 else f"BAN-{g['gen']}"
    assert f"| {name} | tiny | 1.5k | {100 * g['test_error']:.2f} |" in md


def _scalars(logdir):
  acc = ea.EventAccumulator(logdir, size_guidance={ea.TENSORS: 0})
  acc.Reload()
  return {
    tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    for tag in acc.Tags()["tensors"]
    if not tag.startswith("_hparams_")
  }


def test_tensorboard_runs_per_generation(run_dir):
  # One TensorBoard run per generation, named by its row: tb/Teacher, tb/BAN-1, ...
  names = ["Teacher"] + [f"BAN-{g}" for g in range(1, GENS + 1)]
  # ... and report.py's series over the generation index (tb/generations, tb/ensembles).
  # with the 95% CI bounds of each row's paired Δ vs the teacher (_ci95_low, _ci95_high).
  series = [f + b for f in ("generations", "ensembles") for b in ("", "_ci95_low", "_ci95_high")]
  assert sorted(os.listdir(os.path.join(run_dir, "tb"))) == sorted(names + ["BANE-2"] + series)
  per_gen = [_scalars(os.path.join(run_dir, "tb", n)) for n in names]
  tags = [set(s) for s in per_gen]
  # The same tags in every generation (so TensorBoard overlays them), except that only
  # students, which have a teacher, log teacher_agreement and the KD term, and that a
  # term with weight 0 draws no all-zero line (BAN students: no label term).
  assert not {"train/teacher_agreement", "train/kd_loss"} & tags[0]
  for t in tags[1:]:
    assert t == tags[1]
    assert t - tags[0] == {"train/teacher_agreement", "train/kd_loss"} and tags[0] - t == {
      "train/label_loss"
    }
  assert {
    "train/loss",
    "train/accuracy",
    "train/learning_rate",
    "val/accuracy",
    "test/error",
  } <= tags[0]
  for g, scalars in enumerate(per_gen):
    history = export.read_json(os.path.join(run_dir, f"gen_{g}", "history.json"))
    metrics = export.read_json(os.path.join(run_dir, f"gen_{g}", "metrics.json"))
    for tag, points in scalars.items():
      steps = [s for s, _ in points]
      if tag.startswith("test/"):
        assert steps == [EPOCHS], tag
      else:
        assert steps == list(range(1, EPOCHS + 1)), tag  # step = epoch, 1-based
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history])
    assert [v for _, v in scalars["val/accuracy"]] == pytest.approx(
      [h["val_accuracy"] for h in history]
    )
    assert scalars["test/error"][0][1] == pytest.approx(metrics["test_error"])


def test_evaluate_reloads_savedmodels_and_matches_results(run_dir, tmp_path):
  out = str(tmp_path / "eval.json")
  stdout = _python("-m", "ban_tf.evaluate", f"--run_dir={run_dir}", f"--output_json={out}")
  evaluated = export.read_json(out)
  results = export.read_json(os.path.join(run_dir, "results.json"))
  assert len(evaluated["generations"]) == GENS + 1 == len(results["generations"])
  assert len(evaluated["ensembles"]) == len(results["ensembles"]) >= 1
  for got, want in zip(
    evaluated["generations"] + evaluated["ensembles"], results["generations"] + results["ensembles"]
  ):
    assert abs(got["test_accuracy"] - want["test_accuracy"]) < 1e-6, (got, want)
    assert abs(got["test_error"] - want["test_error"]) < 1e-6
  assert "| BANE-2 | ensemble of 1,2 |" in stdout
  assert "max |accuracy difference| vs results.json" in stdout


def test_labels_exported_beside_savedmodels(run_dir):
  names = tfds.builder("fashion_mnist", data_dir=SHARED_TFDS).info.features["label"].names
  for sub in [f"gen_{g}" for g in range(GENS + 1)] + ["ensemble_2"]:
    with open(os.path.join(run_dir, sub, "saved_model", export.LABELS_FILE)) as f:
      assert f.read().splitlines() == names


def test_classify_image_files(run_dir, tmp_path, capsys):
  names = tfds.builder("fashion_mnist", data_dir=SHARED_TFDS).info.features["label"].names
  ds = tfds.load("fashion_mnist", split="test[:2]", data_dir=SHARED_TFDS, as_supervised=True)
  images = [x for x, _ in tfds.as_numpy(ds)]
  png = str(tmp_path / "native.png")  # same size and channels as the model's input
  Image.fromarray(images[0][..., 0]).save(png)
  jpg = str(tmp_path / "rgb_big.jpg")  # RGB, twice the size: converted and resized
  Image.fromarray(images[1][..., 0]).convert("RGB").resize((56, 56)).save(jpg)
  model_dir = os.path.join(run_dir, "gen_1", "saved_model")
  # In-process (the fresh-process path is covered above): the CLI's own main().
  fv = types.SimpleNamespace(run_dir=None, saved_model=model_dir, images=[png, jpg], top_k=3)
  evaluate.main(["evaluate"], fv)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(str(tmp_path))]
  assert [l.split(":")[0] for l in lines] == [png, jpg]
  for line in lines:
    top = line.split(": ", 1)[1].split(", ")
    assert len(top) == 3 and all(t.rsplit(" (", 1)[0] in names for t in top), line
    probs = [float(t.rsplit("(", 1)[1].rstrip(")")) for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-3
  # The PNG holds exactly the test image's pixels: the top class is the model's own argmax.
  model = tf.saved_model.load(model_dir)
  logits = model.serve(tf.constant(images[0][None].astype(np.float32))).numpy()
  assert lines[0].split(": ", 1)[1].startswith(names[int(np.argmax(logits))] + " (")


def test_classify_rejects_bad_input(run_dir, tmp_path):
  bad = tmp_path / "not_an_image.png"
  bad.write_text("hello")
  with pytest.raises(errors.UsageError, match="not a readable image"):
    evaluate.classify(os.path.join(run_dir, "gen_0", "saved_model"), [str(bad)])
  with pytest.raises(errors.UsageError, match="not a SavedModel"):
    evaluate.classify(run_dir, [str(bad)])
