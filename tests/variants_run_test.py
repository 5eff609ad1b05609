"""Cross-architecture students, shared stem/head, features endpoint, seeds and baseline.

One short end-to-end run on the shared fashion_mnist (skipped when it is absent):
DenseNet teacher -> teacher-matched WRN student with --share_stem_head,
--feature_weight with a projection, --seeds=2 and --baseline.
"""

import json
import os

import keras
import numpy as np
import pytest

from ban_tf import config as config_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import results
from ban_tf import tasks
from ban_tf import main as main_lib
from ban_tf import models
from ban_tf import train
from ban_tf import teacher as teacher_lib
from tests.conftest import SHARED_TFDS

_HAS_DATA = os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist"))


def test_densenet_widths_and_match_resolution():
  w = models.densenet_widths("densenet-90-60")
  # stem 2k; blocks 14/14/14 layers of growth 60, each compressed by 0.5.
  assert w == {"stem": 120, "blocks": (480, 660, 750), "features": 1500}
  assert models.resolve_arch("wrn-match-4", "densenet-90-60", 0.5) == "wrnw-4-120-240-330-375-1500"
  assert (
    models.resolve_arch("prebn-match-14", "densenet-90-60", 1) == "prebw-14-120-480-660-750-1500"
  )
  assert models.resolve_arch("wrn-28-10", None, 1) == "wrn-28-10"
  with pytest.raises(ValueError, match="DenseNet"):
    models.resolve_arch("wrn-match-1", "wrn-28-10", 1)
  with pytest.raises(ValueError, match="resolve_arch"):
    models.parse_arch("wrn-match-1")


@pytest.mark.parametrize("arch", ["wrnw-2-8-8-12-16-24", "prebw-1-8-8-12-16", "wrnw-1-4-4-4-4"])
def test_explicit_width_models(arch):
  spec = models.parse_arch(arch)
  m = models.build_model(arch, 5, (16, 16, 3))
  assert m.get_layer("stem").kernel.shape[-1] == spec["stem"]
  assert m.get_layer("features").output.shape[-1] == (spec["out"] or spec["widths"][-1])
  assert tuple(m(np.zeros((2, 16, 16, 3), "float32")).shape) == (2, 5)


def test_copy_and_freeze():
  keras.utils.set_random_seed(0)
  teacher = models.build_model("densenet-10-4", 7, (16, 16, 1))
  student = models.build_model(
    models.resolve_arch("wrn-match-1", "densenet-10-4", 0.5), 7, (16, 16, 1)
  )
  models.copy_and_freeze(student, teacher)
  for name in ("stem", "logits"):
    for a, b in zip(student.get_layer(name).get_weights(), teacher.get_layer(name).get_weights()):
      np.testing.assert_array_equal(a, b)
    assert not student.get_layer(name).trainable_weights
  with pytest.raises(ValueError, match="cannot share layer 'logits'"):
    models.copy_and_freeze(models.build_model("tiny", 7, (16, 16, 1)), teacher)


def test_config_rules():
  bad = [
    dict(arch="wrn-match-1"),  # no teacher
    dict(arch="wrn-match-1", teacher_arch="wrn-28-1"),  # not a DenseNet teacher
    dict(arch="wrn-28-1", student_width_ratio=0.5),  # ratio without a -match- student
    dict(feature_projection=True),  # projection without the term
    dict(seeds=0),
  ]
  for kw in bad:
    with pytest.raises(errors.UsageError):
      config_lib.Config(**kw).validate()
  cfg = config_lib.Config(arch="wrn-match-2", teacher_arch="densenet-90-60", seeds=3)
  cfg.validate()
  assert cfg.arch_for(0) == "densenet-90-60" and cfg.arch_for(2) == "wrnw-2-120-480-660-750-1500"
  assert cfg.seed_list() == [0, 100, 200]


def test_aggregate_mean_std():
  def res(errs):
    gens = [
      {"gen": i, "arch": "tiny", "params": 1000, "test_error": e} for i, e in enumerate(errs[:2])
    ]
    ens = [{"name": "BANE-2", "members": [0, 1], "test_error": errs[2]}]
    return {
      "generations": gens,
      "ensembles": ens,
      "baseline": {"arch": "tiny", "params": 1000, "test_error": errs[3]},
    }

  per_seed = [res([0.2, 0.1, 0.05, 0.3]), res([0.4, 0.2, 0.15, 0.5])]
  metric = tasks.get("image").headline
  rows = results.aggregate(per_seed, metric)
  assert [r["name"] for r in rows] == ["Teacher", "BAN-1", "BANE-2", "Baseline"]
  assert [r["key"] for r in rows] == ["Teacher", "BAN-1", "BANE-2", "Baseline"]
  np.testing.assert_allclose([r["mean"] for r in rows], [30, 15, 10, 40])
  np.testing.assert_allclose(
    [r["std"] for r in rows], np.std([[20, 10, 5, 30], [40, 20, 15, 50]], axis=0, ddof=1)
  )
  assert (
    "| BANE-2 | ensemble of T,1 |  | 10.00 ± 7.07 | -20.00 | 2 | 5.00, 15.00 |"
    in results.aggregate_table(rows, metric)
  )


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_DATA, reason="no shared fashion_mnist")
def test_cross_arch_shared_features_seeds_baseline(tmp_path, monkeypatch):
  from ban_tf import data  # pylint: disable=g-import-not-at-top

  test_split = data.Dataset.test
  # Evaluate on 2 test batches, not 10k images: this test checks plumbing, not accuracy.
  monkeypatch.setattr(data.Dataset, "test", lambda self, b: test_split(self, b).take(2))
  run_dir = str(tmp_path / "run")
  cfg = config_lib.Config(
    dataset="fashion_mnist",
    data_dir=SHARED_TFDS,
    train_examples=128,
    batch_size=64,
    epochs=1,
    gens=1,
    teacher_arch="densenet-10-4",
    arch="wrn-match-1",
    student_width_ratio=0.5,
    share_stem_head=True,
    feature_weight=0.5,
    feature_projection=True,
    seeds=2,
    baseline=True,
    run_dir=run_dir,
    verbose="0",
    lr=0.05,
  )
  summary = main_lib.run(cfg)
  assert summary["seeds"] == [0, 100]
  assert [r["name"] for r in summary["rows"]] == ["Teacher", "BAN-1", "Baseline"]
  assert all(r["n"] == 2 for r in summary["rows"])
  assert "mean ± std" in open(os.path.join(run_dir, "results.md")).read()
  for seed in (0, 100):
    sub = os.path.join(run_dir, f"seed_{seed}")
    assert json.load(open(os.path.join(sub, "config.json")))["seed"] == seed
    metrics = json.load(open(os.path.join(sub, "gen_1", "metrics.json")))
    assert metrics["arch"] == "wrnw-1-8-4-4-4-9" and metrics["seed"] == seed + 1
    assert metrics["objective"]["feature_weight"] == 0.5
    assert "feature_loss" in metrics["final_train"]
    base = json.load(open(os.path.join(sub, "baseline", "metrics.json")))
    assert base["objective"]["loss"] == "labels" and base["seed"] == seed + 1
    assert base["arch"] == metrics["arch"] and base["teacher"] is None
    teacher = keras.saving.load_model(os.path.join(sub, "gen_0", "model.keras"), compile=False)
    student = keras.saving.load_model(os.path.join(sub, "gen_1", "model.keras"), compile=False)
    for name in ("stem", "logits"):  # copied, then frozen through training
      for a, b in zip(student.get_layer(name).get_weights(), teacher.get_layer(name).get_weights()):
        np.testing.assert_array_equal(a, b)
    # The student's features endpoint reproduces its features layer; serve is unchanged.
    x = export.fingerprint_inputs((28, 28, 1))
    layer = teacher_lib.Teacher.load(
      os.path.join(sub, "gen_1", "saved_model"), expected_classes=10, with_features=True
    )
    out = layer(x)
    feats = keras.Model(student.inputs, student.get_layer("features").output)(x)
    np.testing.assert_allclose(out.features, feats, atol=1e-4)
    np.testing.assert_allclose(out.logits, student(x), atol=1e-4)
    assert layer.feature_dim == 9

  # Different feature widths without a projection, and an unshareable stem: one-line errors.
  sub = os.path.join(run_dir, "seed_0")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  ds = data.Dataset("fashion_mnist", SHARED_TFDS, train_examples=128)
  teacher_path = os.path.join(sub, "gen_0", "saved_model")
  strategy = tf.distribute.get_strategy()
  for kw, msg in [
    (dict(arch="tiny", feature_weight=0.5), "add --feature_projection"),
    (dict(arch="tiny", share_stem_head=True), "cannot share layer 'logits'"),
  ]:
    bad = config_lib.Config(
      dataset="fashion_mnist",
      data_dir=SHARED_TFDS,
      train_examples=128,
      batch_size=64,
      epochs=1,
      teacher_arch="densenet-10-4",
      **kw,
    )
    with pytest.raises(errors.TeacherError, match=msg) as err:
      train.train_generation(bad, 1, strategy, ds, str(tmp_path / "bad"), teacher_path)
    assert "\n" not in str(err.value)
