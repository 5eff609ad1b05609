"""Distiller: loss values vs NumPy, teacher hygiene, 1- vs 2-replica equality."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import distiller as distiller_lib
from ban_tf import export
from ban_tf import models
from ban_tf import teacher as teacher_lib
from tests import losses_test as ref
from tests.conftest import strategy_for

NUM_CLASSES = 10
SHAPE = (8, 8, 3)


def plain_net(seed, name):
  """A BN-free net: its update does not depend on how the batch is split."""
  keras.utils.set_random_seed(seed)
  x = keras.Input(SHAPE)
  h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x / 255.0)
  h = keras.layers.GlobalAveragePooling2D(name="features")(h)
  return keras.Model(x, keras.layers.Dense(NUM_CLASSES, name="logits")(h), name=name)


def batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return rng.uniform(0, 255, (n,) + SHAPE).astype(np.float32), rng.randint(
    0, NUM_CLASSES, n
  ).astype(np.int32)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("teacher") / "saved_model")
  export.export_saved_model(plain_net(123, "teacher_net"), path, SHAPE)
  return path


def one_step(
  strategy,
  teacher_dir,
  *,
  loss,
  temperature=1.0,
  kd_weight=1.0,
  label_weight=0.0,
  weight_decay=0.0,
  lr=0.1,
):
  x, y = batch()
  teacher = teacher_lib.Teacher.load(teacher_dir, strategy) if teacher_dir else None
  with strategy.scope():
    student = plain_net(7, "student_net")
    model = distiller_lib.Distiller(
      student,
      teacher,
      loss=loss,
      temperature=temperature,
      kd_weight=kd_weight,
      label_weight=label_weight,
      weight_decay=weight_decay,
    )
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9, nesterov=True))
  before = [v.numpy().copy() for v in student.trainable_variables]
  teacher_before = [v.numpy().copy() for v in teacher.variables] if teacher else []
  hist = model.fit(
    tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x)), epochs=1, verbose=0, shuffle=False
  )
  logs = {k: v[-1] for k, v in hist.history.items()}
  after = [v.numpy() for v in student.trainable_variables]
  teacher_after = [v.numpy() for v in teacher.variables] if teacher else []
  return model, before, after, logs, teacher_before, teacher_after


def mirrored2():
  return strategy_for(2)


def numpy_objective(teacher_dir, *, loss, temperature, kd_weight, label_weight):
  x, y = batch()
  s = plain_net(7, "student_ref")(x).numpy().astype(np.float64)
  loaded = tf.saved_model.load(teacher_dir)  # keep a reference while calling it
  t = loaded.serve(tf.constant(x)).numpy().astype(np.float64)
  if loss == "cwtm":
    w = ref.np_softmax(t).max(-1)
    return {"label_loss": (w * ref.np_ce(y, s)).sum() / w.sum(), "kd_loss": 0.0}
  out = {"kd_loss": ref.np_kd(t, s, temperature).mean(), "label_loss": ref.np_ce(y, s).mean()}
  out["loss"] = kd_weight * out["kd_loss"] + label_weight * out["label_loss"]
  return out


@pytest.mark.parametrize(
  "loss,temperature,kd_weight,label_weight",
  [
    ("ban", 1.0, 1.0, 0.0),
    ("kd", 4.0, 1.0, 0.0),
    ("ban_l", 1.0, 1.0, 1.0),
    ("kd", 4.0, 0.7, 0.3),
    ("cwtm", 1.0, 0.0, 1.0),
  ],
)
def test_logged_losses_match_numpy(teacher_dir, loss, temperature, kd_weight, label_weight):
  _, _, _, logs, _, _ = one_step(
    tf.distribute.get_strategy(),
    teacher_dir,
    loss=loss,
    temperature=temperature,
    kd_weight=kd_weight,
    label_weight=label_weight,
  )
  want = numpy_objective(
    teacher_dir, loss=loss, temperature=temperature, kd_weight=kd_weight, label_weight=label_weight
  )
  if loss != "cwtm":
    np.testing.assert_allclose(logs["kd_loss"], want["kd_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], want["loss"], rtol=1e-5)
  if label_weight:
    np.testing.assert_allclose(logs["label_loss"], want["label_loss"], rtol=1e-5)
  else:
    assert logs["label_loss"] == 0.0


def test_weight_decay_is_coupled_l2(teacher_dir):
  wd = 1e-2
  _, before, _, logs, _, _ = one_step(
    tf.distribute.get_strategy(), teacher_dir, loss="ban", weight_decay=wd
  )
  l2 = 0.5 * wd * sum(float((b.astype(np.float64) ** 2).sum()) for b in before)
  np.testing.assert_allclose(logs["l2_loss"], l2, rtol=1e-5)
  np.testing.assert_allclose(logs["loss"], logs["kd_loss"] + l2, rtol=1e-5)


def test_teacher_frozen_and_distinct_from_student(teacher_dir):
  model, before, after, logs, t_before, t_after = one_step(
    tf.distribute.get_strategy(), teacher_dir, loss="ban"
  )
  assert model.teacher is not model.student
  assert not {id(v) for v in model.teacher.variables} & {id(v) for v in model.student.variables}
  assert model.teacher.trainable_variables == []
  assert t_before and all(np.array_equal(a, b) for a, b in zip(t_before, t_after))
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))  # the student did move
  assert 0.0 <= logs["teacher_agreement"] <= 1.0
  assert {"loss", "kd_loss", "label_loss", "accuracy", "teacher_agreement"} <= set(logs)


def test_teacher_batchnorm_statistics_do_not_move(tmp_path):
  """A teacher with BatchNorm (moving stats) stays in inference mode."""
  keras.utils.set_random_seed(3)
  net = models.build_model("tiny", NUM_CLASSES, SHAPE)
  path = str(tmp_path / "saved_model")
  export.export_saved_model(net, path, SHAPE)
  student = models.build_model("tiny", NUM_CLASSES, SHAPE, name="student_tiny")
  teacher = teacher_lib.Teacher.load(path)
  model = distiller_lib.Distiller(student, teacher)
  model.compile(optimizer=keras.optimizers.SGD(0.1))
  t_before = [v.numpy().copy() for v in teacher.variables]
  x, y = batch()
  model.fit(x, y, batch_size=8, epochs=2, verbose=0)
  assert all(np.array_equal(a, v.numpy()) for a, v in zip(t_before, teacher.variables))
  # And its outputs still equal the SavedModel's own.
  np.testing.assert_allclose(
    teacher(tf.constant(x)).logits.numpy(), net(x, training=False).numpy(), atol=1e-5
  )


@pytest.mark.parametrize(
  "loss,temperature,label_weight",
  [("labels", 1.0, 0.0), ("ban", 1.0, 0.0), ("kd", 4.0, 0.5), ("cwtm", 1.0, 1.0)],
)
@pytest.mark.slow
def test_one_vs_two_replicas_same_update(teacher_dir, loss, temperature, label_weight):
  kwargs = dict(loss=loss, temperature=temperature, label_weight=label_weight, weight_decay=5e-3)
  tdir = None if loss == "labels" else teacher_dir
  _, before1, after1, logs1, _, _ = one_step(tf.distribute.get_strategy(), tdir, **kwargs)
  strategy = mirrored2()
  assert strategy.num_replicas_in_sync == 2
  _, before2, after2, logs2, _, _ = one_step(strategy, tdir, **kwargs)
  for b1, b2 in zip(before1, before2):
    np.testing.assert_array_equal(b1, b2)  # same initial student
  for a1, a2, b1 in zip(after1, after2, before1):
    assert not np.allclose(a1, b1)
    np.testing.assert_allclose(a2 - b1, a1 - b1, rtol=1e-4, atol=1e-7)  # same update
  for key in ("loss", "kd_loss", "label_loss", "l2_loss", "accuracy"):
    np.testing.assert_allclose(
      logs2[key], logs1[key], rtol=1e-5, err_msg=key
    )  # true, unscaled values


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.slow
def test_clip_norm_clips_the_unscaled_gradient_under_mixed_float16(replicas):
  """clip_norm bounds the true gradient's norm under mixed_float16 too: one SGD step (lr 1)
  moves the weights by clip_norm, as in float32 (once: the loss-scaled gradient was clipped,
  so the step was 1/32768 of it)."""

  def step_norm(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
      with strategy_for(replicas).scope():
        student = plain_net(7, "student_net")
        model = distiller_lib.Distiller(student, clip_norm=0.01)
        model.compile(optimizer=keras.optimizers.SGD(1.0))
      scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
      assert scaled == (policy == "mixed_float16")
      before = [w.numpy() for w in student.trainable_weights]
      x, y = batch()
      model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
      delta = [w.numpy() - b for w, b in zip(student.trainable_weights, before)]
      return float(np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in delta)))
    finally:
      keras.mixed_precision.set_global_policy("float32")

  f32, f16 = step_norm("float32"), step_norm("mixed_float16")
  assert f32 == pytest.approx(0.01, rel=1e-4)  # the unclipped gradient is far longer
  assert f16 == pytest.approx(f32, rel=1e-3)
