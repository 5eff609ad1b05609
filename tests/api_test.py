"""The Python API: the README's "From Python" example, labels, compile and save."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import distiller
from ban_tf import errors
from ban_tf import export
from ban_tf import teacher as teacher_lib
from tests.conftest import REPO
from tests.conftest import strategy_for


def readme_example():
  text = open(os.path.join(REPO, "README.md")).read()
  section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_from_python_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(readme_example(), "README.md", "exec"), scope)  # pylint: disable=exec-used
  history = scope["history"].history
  assert {"loss", "kd_loss", "accuracy", "teacher_agreement", "top2"} <= set(history)
  assert len(history["top2"]) == 2 and 0.0 <= history["top2"][-1] <= 1.0
  assert "top2" in capsys.readouterr().out
  sig = tf.saved_model.load("student_saved_model").signatures["serving_default"]
  assert list(sig.structured_input_signature[1]) == ["pixels"] and list(sig.structured_outputs) == [
    "logits"
  ]
  x = scope["images"][:5]
  np.testing.assert_allclose(
    keras.saving.load_model("student.keras")(x), scope["student"](x), atol=1e-5
  )


def _net(seed, classes=4):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((6, 6, 2))
  x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
  return keras.Model(inputs, keras.layers.Dense(classes)(x))


def _data(n=16, classes=4):
  rng = np.random.default_rng(1)
  return rng.uniform(0, 255, (n, 6, 6, 2)).astype("float32"), rng.integers(0, classes, n)


def _fit(labels, teacher=None, metrics=None, epochs=1):
  x, _ = _data()
  model = distiller.Distiller(_net(3), teacher, loss="ban_l", label_weight=0.5)
  model.compile(optimizer=keras.optimizers.SGD(0.1), metrics=metrics)
  hist = model.fit(x, labels, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
  return model, hist.history


@pytest.mark.parametrize("with_teacher", [False, True])
def test_one_hot_labels_train_exactly_as_class_ids(with_teacher):
  _, y = _data()
  teacher = _net(9) if with_teacher else None
  sparse, h_sparse = _fit(y, teacher)
  one_hot, h_one_hot = _fit(keras.utils.to_categorical(y, 4), teacher)
  column, h_column = _fit(y.reshape(-1, 1), teacher)  # Keras' [N, 1] class ids
  for a, b in zip(sparse.student.get_weights(), one_hot.student.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for a, b in zip(sparse.student.get_weights(), column.student.get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert h_sparse["label_loss"] == pytest.approx(h_one_hot["label_loss"], rel=1e-6)
  x, _ = _data()
  ev = one_hot.evaluate(x, keras.utils.to_categorical(y, 4), verbose=0, return_dict=True)
  want = np.mean(np.argmax(one_hot.student(x).numpy(), -1) == y)
  assert ev["accuracy"] == pytest.approx(want)


def test_soft_labels_are_refused_not_rounded():
  _, y = _data()
  soft = 0.9 * keras.utils.to_categorical(y, 4) + 0.025
  with pytest.raises(tf.errors.InvalidArgumentError, match="must be one-hot"):
    _fit(soft)


def test_compiled_metrics_are_logged_with_golden_values():
  x, y = _data()
  top2 = keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")
  model, hist = _fit(y, _net(9), metrics=[top2], epochs=2)
  assert len(hist["top2"]) == 2 and "teacher_agreement" in hist
  ev = model.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
  logits = model.student(x).numpy()
  want = np.mean([y[i] in np.argsort(-logits[i])[:2] for i in range(len(y))])
  assert ev["top2"] == pytest.approx(want)
  assert {"label_loss", "accuracy", "top2"} <= set(ev)


def test_compile_loss_and_save_say_what_to_do_instead(tmp_path):
  model = distiller.Distiller(_net(0), _net(1))
  with pytest.raises(ValueError, match=r"objective is set by Distiller\("):
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
  with pytest.raises(ValueError, match="weighted_metrics"):
    model.compile(optimizer="sgd", weighted_metrics=["accuracy"])
  model.compile(optimizer="sgd")
  with pytest.raises(NotImplementedError, match=r"distiller.student.save"):
    model.save(str(tmp_path / "d.keras"))
  assert not os.listdir(tmp_path)


def test_student_and_teacher_by_keyword_and_keras_arguments_refused():
  """ban_tf's order is (student, teacher), Keras' keras.distillation.Distiller's (teacher,
  student, distillation_losses, ...): keywords name them either way round; a call meant for
  Keras' class is refused, not read with the two models swapped."""
  s, t = _net(0), _net(1)
  by_keyword = distiller.Distiller(teacher=t, student=s, loss="kd")

  # The Distiller wraps its teacher once (teacher.Teacher.wrap): it reads t's weights, not s's.
  def teacher_weights(d):
    return [id(v) for v in d.teacher.variables]

  assert by_keyword.student is s and teacher_weights(by_keyword) == [id(v) for v in t.variables]
  assert not t.trainable
  positional = distiller.Distiller(s, t)
  assert positional.student is s and teacher_weights(positional) == [id(v) for v in t.variables]
  for kw in (dict(distillation_losses=[]), dict(student_loss_weight=0.5)):
    with pytest.raises(
      ValueError, match=r"belong to keras.distillation.Distiller\(teacher, student"
    ):
      distiller.Distiller(_net(1), _net(0), **kw)


@pytest.mark.parametrize(
  "metric", ["accuracy", keras.metrics.SparseCategoricalAccuracy(name="accuracy"), "loss"]
)
def test_compiled_metric_named_as_the_distillers_own_is_refused(metric):
  """compile(metrics=["accuracy"]) would log under the Distiller's own `accuracy` key (one of
  the two silently replaced the other); refused, naming the way out. Other names log beside."""
  model = distiller.Distiller(_net(0), _net(1))
  with pytest.raises(ValueError, match=r"the Distiller's own metric of that name.*name='top1'"):
    model.compile(optimizer="sgd", metrics=[metric])
  model.compile(optimizer="sgd", metrics=["acc", keras.metrics.SparseCategoricalAccuracy()])


def test_saved_model_teachers_with_named_or_any_single_output(tmp_path):
  """A ban_tf SavedModel's serving_default ({"logits"}) and a plain Keras export's
  ({"output_0"}) both teach through TFSMLayer."""
  x, _ = _data(4)
  net = _net(5)
  want = net(x).numpy()
  export.export_saved_model(net, str(tmp_path / "ours"), (6, 6, 2))
  net.export(str(tmp_path / "plain"), verbose=False)
  for name in ("ours", "plain"):
    layer = keras.layers.TFSMLayer(str(tmp_path / name), call_endpoint="serving_default")
    model = distiller.Distiller(_net(6), layer)
    np.testing.assert_allclose(model.teacher_logits(tf.constant(x)).numpy(), want, atol=1e-5)


def test_load_teacher_of_a_foreign_saved_model_says_what_reads_it(tmp_path):
  """Teacher.load checks a ban_tf fingerprint; a plain Keras export has none (once: a
  FileNotFoundError advising to retrain a generation)."""
  _net(5).export(str(tmp_path / "plain"), verbose=False)
  with pytest.raises(
    errors.TeacherError,
    match=r"has no fingerprint.npz: one not exported by ban_tf is read with "
    r"keras.layers.TFSMLayer\(path, call_endpoint='serving_default'\)",
  ):
    teacher_lib.Teacher.load(str(tmp_path / "plain"))


def test_probability_teachers_teach_their_log_probabilities(tmp_path):
  """A BANE-style SavedModel ({"probabilities"}) through TFSMLayer, and a softmax keras.Model with
  teacher_outputs="probabilities": the targets are log p (softmax(log p / T) = p^(1/T), renormalised),
  never p read as logits (which once happened silently)."""
  x, _ = _data(4)
  net = _net(5)
  probs = keras.Model(net.inputs, keras.layers.Softmax()(net.outputs[0]))
  p = probs(x).numpy()
  export.export_saved_model(
    probs, str(tmp_path / "ensemble"), (6, 6, 2), output_name=export.PROBABILITIES
  )
  layer = keras.layers.TFSMLayer(str(tmp_path / "ensemble"), call_endpoint="serving_default")
  for model in (
    distiller.Distiller(_net(6), layer),
    distiller.Distiller(_net(6), probs, teacher_outputs="probabilities"),
  ):
    t = model.teacher_logits(tf.constant(x)).numpy()
    np.testing.assert_allclose(t, np.log(p), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="teacher_outputs='softmax'"):
    distiller.Distiller(_net(6), probs, teacher_outputs="softmax")


@pytest.mark.slow
def test_compiled_metrics_and_one_hot_labels_on_two_replicas():
  """1 vs 2 replicas: the same student weights and the same logged extra metric."""
  x, y = _data()
  two = strategy_for(2)
  runs = []
  for strategy in (tf.distribute.get_strategy(), two):
    with strategy.scope():
      model = distiller.Distiller(_net(3), _net(9), loss="ban_l", label_weight=0.5)
      model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        metrics=[keras.metrics.CategoricalAccuracy(name="acc_one_hot")],
      )
    ds = tf.data.Dataset.from_tensor_slices((x, keras.utils.to_categorical(y, 4))).batch(8)
    hist = model.fit(ds, epochs=2, verbose=0).history
    runs.append((model.student.get_weights(), hist["acc_one_hot"], hist["accuracy"]))
  for a, b in zip(runs[0][0], runs[1][0]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(runs[0][1], runs[1][1])
  np.testing.assert_allclose(runs[1][1], runs[1][2])  # categorical accuracy on one-hot == ours
