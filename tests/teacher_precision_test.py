"""The teacher at the student's compute precision under mixed precision (issue 17).

A generation trained under --mixed_precision=bf16 exports a SavedModel whose graph
computes in bfloat16 and returns float32 logits; the next generation calls it
inside its compiled step and computes the KD target from those logits in float32.
This bounds that target against the same weights exported in float32.
"""

import numpy as np
import pytest
import keras
import tensorflow as tf

from ban_tf import distiller
from ban_tf import export
from ban_tf import losses
from ban_tf import models
from ban_tf import teacher as teacher_lib

SHAPE = (16, 16, 3)


def _model(policy, weights=None):
  keras.mixed_precision.set_global_policy(policy)
  keras.utils.set_random_seed(3)
  model = models.build_model(
    "preact-resnet-8", 10, SHAPE, mean=(120.0,) * 3, std=(60.0,) * 3, name="t"
  )
  if weights is not None:
    model.set_weights(weights)
  return model


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  try:
    f32 = _model("float32")
    # Spread the logits so the soft targets are far from uniform (a trained teacher's are).
    logits = f32.get_layer("logits")
    logits.kernel.assign(logits.kernel * 30.0)
    export.export_saved_model(f32, str(root / "f32"), SHAPE)
    bf16 = _model("mixed_bfloat16", f32.get_weights())
    export.export_saved_model(bf16, str(root / "bf16"), SHAPE)
    t32 = teacher_lib.Teacher.load(str(root / "f32"), expected_classes=10)
    t16 = teacher_lib.Teacher.load(str(root / "bf16"), expected_classes=10)
    yield t32, t16
  finally:
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_a_mixed_precision_teacher_computes_in_bfloat16(teachers):
  t32, t16 = teachers
  assert t32.compute_dtype_found == "float32"
  assert t16.compute_dtype_found == "bfloat16"


@pytest.mark.slow
def test_kd_target_of_bf16_teacher_is_float32_and_close_to_float32_teacher(teachers):
  t32, t16 = teachers
  x = tf.constant(np.random.RandomState(0).uniform(0, 255, (64,) + SHAPE).astype(np.float32))
  student_logits = tf.constant(np.random.RandomState(1).normal(0, 2, (64, 10)).astype(np.float32))
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    student = _model("mixed_bfloat16")
    d32 = distiller.Distiller(student, t32)
    d16 = distiller.Distiller(student, t16)
    # Inside a compiled function, as in the train step.
    l32 = tf.function(lambda v: d32.teacher_logits(v))(x)
    l16 = tf.function(lambda v: d16.teacher_logits(v))(x)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert l16.dtype == tf.float32 and l32.dtype == tf.float32
  assert float(tf.math.reduce_std(l32)) > 2.0  # non-trivial targets
  for temperature in (1.0, 4.0):
    p32 = tf.nn.softmax(l32 / temperature).numpy()
    p16 = tf.nn.softmax(l16 / temperature).numpy()
    assert np.abs(p16 - p32).max() < 0.03, temperature  # measured 0.013
    kd32 = losses.kd(l32, student_logits, temperature).numpy()
    kd16 = losses.kd(l16, student_logits, temperature).numpy()
    np.testing.assert_allclose(kd16.mean(), kd32.mean(), rtol=0.005)  # measured 2e-4
  assert (l16.numpy().argmax(1) == l32.numpy().argmax(1)).mean() >= 0.95
  # bfloat16 keeps 8 mantissa bits: logits within a few percent of their spread (measured 1.3%).
  assert np.abs(l16.numpy() - l32.numpy()).max() < 0.05 * float(tf.math.reduce_std(l32))
  assert not np.array_equal(l16.numpy(), l32.numpy())  # it does run in bfloat16


def test_bf16_student_trains_on_bf16_teacher_in_one_compiled_step(teachers):
  _, t16 = teachers
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = distiller.Distiller(_model("mixed_bfloat16"), t16, temperature=2.0)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    x = np.random.RandomState(2).uniform(0, 255, (32,) + SHAPE).astype(np.float32)
    y = np.random.RandomState(3).randint(0, 10, 32).astype(np.int32)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert np.isfinite(logs["kd_loss"][-1]) and logs["kd_loss"][-1] > 0
