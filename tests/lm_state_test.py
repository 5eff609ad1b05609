"""Carried LSTM state (--lm_state=carry): golden values against one call on the concatenated stream.

Covers lm_models.stateful, distiller.CarriedState (training, with a stateful
teacher, and stream evaluation), the SavedModel's `serve_stateful` endpoint,
text_data's stream layout (independent of the batch size), 1, 2 and 3 replicas (each
replica carries its own rows' state) and resuming from an epoch checkpoint.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ban_tf import distiller as distiller_lib
from ban_tf import evaluate
from ban_tf import export
from ban_tf import lm_models
from ban_tf import tasks
from ban_tf import text_data
from ban_tf import train
from ban_tf import teacher as teacher_lib
from tests.conftest import strategy_for

V = 13


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _scaled(model, factor=12.0):
  """Weights x factor (uniform +-0.6): the stock +-0.05 init makes every logit ~1e-5, so
  a state that is lost would hide under any tolerance."""
  model.set_weights([w * factor if w.dtype.kind == "f" else w for w in model.get_weights()])
  return model


def _corpus(directory, n=400):
  rng = np.random.RandomState(3)
  for name in ("train", "valid", "test"):
    words = " ".join(f"w{i}" for i in rng.randint(0, 9, n))
    with open(os.path.join(directory, f"ptb.{name}.txt"), "w") as f:
      f.write(words.replace("w0 ", "w0\n"))


@pytest.mark.parametrize(
  "arch,vocab", [("lstm-2-8", V), ("cnn-lstm-small", tuple("abcdefghijklm"))]
)
def test_carried_windows_equal_one_call_on_the_stream(arch, vocab):
  keras.utils.set_random_seed(0)
  model = _scaled(lm_models.build_model(arch, vocab))
  stateful = lm_models.stateful(model)
  assert stateful.count_params() == model.count_params()  # the same weights
  ids = np.random.RandomState(1).randint(0, 13, (3, 17)).astype(np.int32)
  state = tf.zeros([3, lm_models.state_size(model)])
  parts = []
  for s in range(0, 17, 5):  # windows 5, 5, 5, 2
    logits, state = stateful([tf.constant(ids[:, s : s + 5]), state])
    parts.append(logits.numpy())
  np.testing.assert_allclose(np.concatenate(parts, 1), model(ids).numpy(), rtol=1e-4, atol=1e-5)
  # A zero state is the stateless model; a carried one is not.
  zero = stateful([tf.constant(ids[:, 5:10]), tf.zeros_like(state)])[0].numpy()
  np.testing.assert_allclose(zero, model(ids[:, 5:10]).numpy(), atol=1e-6)
  assert np.abs(zero - parts[1]).max() > 0.05


def _teacher_fn(teacher_stateful):
  return teacher_lib.Teacher.wrap(teacher_stateful, stateful=True)


def _train(replicas, rows, steps_per_epoch, lr=0.5, with_teacher=True, seed=4):
  """Distiller with CarriedState on windows of `rows`; returns (model, state, teacher_stateful)."""
  strategy = strategy_for(replicas)
  keras.utils.set_random_seed(seed)
  with strategy.scope():
    student = lm_models.build_model("lstm-1-8", V)
    _scaled(student)
    teacher = (
      _scaled(lm_models.build_model("lstm-1-8", V, name="teacher")) if with_teacher else None
    )
    t_stateful = lm_models.stateful(teacher) if with_teacher else None
    state = distiller_lib.CarriedState(
      lm_models.stateful(student),
      lm_models.state_size(student),
      rows.shape[0],
      steps_per_epoch,
      teacher=_teacher_fn(t_stateful) if with_teacher else None,
      teacher_state_size=lm_models.state_size(teacher) if with_teacher else 0,
    )
    model = distiller_lib.Distiller(
      student, teacher, loss="ban_l", kd_weight=1.0, label_weight=1.0, state=state, perplexity=True
    )
    model.compile(optimizer=keras.optimizers.SGD(lr))
  return model, state, t_stateful


def _windows(rows, ks, t=4):
  """Windows k of `rows` as a tf.data pipeline of whole [B, t] batches."""
  x = np.stack([rows[:, t * k : t * k + t] for k in ks])
  y = np.stack([rows[:, t * k + 1 : t * k + t + 1] for k in ks])
  return tf.data.Dataset.from_tensor_slices((x, y))


def _local(strategy, var):
  return np.concatenate([v.numpy() for v in strategy.experimental_local_results(var)], 0)


@pytest.mark.parametrize("replicas", [1, 3])  # 2: as 3 (and in the golden test below)
@pytest.mark.slow
def test_training_state_is_the_stream_state_and_resets_per_epoch(replicas):
  rows = (
    np.random.RandomState(2).randint(0, V, (6, 13)).astype(np.int32)
  )  # 6, 3 or 2 rows per replica
  model, state, t_stateful = _train(replicas, rows, steps_per_epoch=3, lr=0.0)
  student = model.student
  strategy = strategy_for(replicas)
  model.fit(_windows(rows, range(3)), epochs=1, verbose=0)  # one epoch: windows 0..2, in order
  st = lm_models.stateful(student)
  _, want = st([tf.constant(rows[:, :12]), tf.zeros([6, 16])])
  np.testing.assert_allclose(_local(strategy, state.student_state), want.numpy(), atol=1e-5)
  _, want_t = t_stateful([tf.constant(rows[:, :12]), tf.zeros([6, 16])])
  np.testing.assert_allclose(_local(strategy, state.teacher_state), want_t.numpy(), atol=1e-5)
  # Step 3 starts epoch 2: both states restart from zeros.
  model.fit(_windows(rows, [2]), epochs=1, verbose=0)
  _, want = st([tf.constant(rows[:, 8:12]), tf.zeros([6, 16])])
  np.testing.assert_allclose(_local(strategy, state.student_state), want.numpy(), atol=1e-5)


@pytest.mark.slow
def test_training_steps_golden_and_one_two_three_replicas():
  rows = (
    np.random.RandomState(5).randint(0, V, (6, 17)).astype(np.int32)
  )  # 6, 3 or 2 rows per replica
  windows = [(rows[:, 4 * k : 4 * k + 4], rows[:, 4 * k + 1 : 4 * k + 5]) for k in range(4)]
  lr, spe = 0.5, 2  # 4 steps = 2 epochs: the reset is exercised
  got = {}
  for replicas in (1, 2, 3):
    model, _, t_stateful = _train(replicas, rows, spe, lr=lr)
    before = [v.numpy() for v in model.student.trainable_variables]
    model.fit(_windows(rows, range(4)), epochs=1, verbose=0)  # fit: tf.distribute splits the rows
    got[replicas] = [v.numpy() for v in model.student.trainable_variables]
  # Reference: plain TF, truncated BPTT with the carried state, BAN+L per token.
  keras.utils.set_random_seed(4)
  ref = lm_models.build_model("lstm-1-8", V)
  for v, b in zip(ref.trainable_variables, before):
    v.assign(b)
  ref_st = lm_models.stateful(ref)
  s = t = None
  for k, (x, y) in enumerate(windows):
    if k % spe == 0:
      s, t = tf.zeros([6, 16]), tf.zeros([6, 16])
    t_logits, t = t_stateful([tf.constant(x), t])
    with tf.GradientTape() as tape:
      logits, s_new = ref_st([tf.constant(x), s])
      ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
      kd = -tf.reduce_sum(tf.nn.softmax(t_logits) * tf.nn.log_softmax(logits), -1)
      loss = tf.reduce_mean(ce) + tf.reduce_mean(kd)
    s = s_new
    grads = tape.gradient(loss, ref.trainable_variables)
    for v, g in zip(ref.trainable_variables, grads):
      v.assign_sub(lr * tf.convert_to_tensor(g))
  for w_ref, w1, w2, w3 in zip(ref.trainable_variables, got[1], got[2], got[3]):
    np.testing.assert_allclose(w1, w_ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(w2, w1, atol=1e-5)
    np.testing.assert_allclose(w3, w1, atol=1e-5)
  assert (
    np.abs(got[1][0] - before[0]).max() > 1e-2
  )  # the steps moved the weights: the test can fail


def test_batch_must_split_evenly_over_replicas():
  with strategy_for(2).scope():
    student = lm_models.build_model("lstm-1-8", V)
    with pytest.raises(ValueError, match="equal replica shares"):
      distiller_lib.CarriedState(lm_models.stateful(student), 16, 3, 1)


@pytest.mark.slow
def test_evaluation_is_the_whole_stream_whatever_the_batch(tmp_path):
  _corpus(tmp_path)
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=6, state="carry")
  n = len(ds.ids["test"])
  for batch in (1, 4, 7):
    got = [(x.numpy(), y.numpy()) for x, y in ds.test(batch)]
    assert all(x.shape[0] == 1 for x, _ in got)
    y = np.concatenate([y for _, y in got], 1)[0]
    np.testing.assert_array_equal(y, ds.ids["test"])  # every token scored, once, the first included
    x = np.concatenate([x for x, _ in got], 1)[0]
    assert x[0] == ds.info.vocab.index("<eos>") and np.array_equal(x[1:], ds.ids["test"][:-1])
  assert ds.eval_tokens("test", 4) == n
  # The Distiller's stream evaluation equals one call on the whole stream (NumPy CE).
  keras.utils.set_random_seed(0)
  student = _scaled(lm_models.build_model("lstm-1-8", ds.info.num_classes))
  state = distiller_lib.CarriedState(lm_models.stateful(student), 16, 4, 10)
  model = distiller_lib.Distiller(student, state=state, perplexity=True)
  model.compile()
  res = model.evaluate(ds.test(4), return_dict=True)
  xs, ys = ds.stream("test")
  logp = _log_softmax(student(xs).numpy().astype(np.float64))[0]
  ce = -np.take_along_axis(logp, ys[0][:, None], -1).mean()
  np.testing.assert_allclose(res["label_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(res["perplexity"], np.exp(ce), rtol=1e-5)
  np.testing.assert_allclose(res["accuracy"], (logp.argmax(-1) == ys[0]).mean())


def test_training_windows_come_in_order_every_epoch(tmp_path):
  _corpus(tmp_path)
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=5, state="carry")
  pipe, steps = ds.train(4, seed=3, epochs=2)
  want = text_data.windows(text_data.batchify(ds.ids["train"], 4), 5)
  got = [x.numpy() for x, _ in pipe]
  assert len(got) == 2 * steps
  for k, x in enumerate(got):
    np.testing.assert_array_equal(x, want[k % steps][0])


@pytest.mark.slow
def test_stateful_endpoint_reproduces_the_model(tmp_path):
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}" for i in range(11))
  keras.utils.set_random_seed(0)
  model = _scaled(lm_models.build_model("lstm-2-8", vocab))
  task = tasks.get("lm")
  spec = tasks.DataSpec(
    name="toy",
    input_shape=(5,),
    input_dtype="int32",
    input_high=len(vocab),
    input_name="tokens",
    serving_shape=(None,),
    num_outputs=len(vocab),
    output_shape=(None, len(vocab)),
    output_unit="words",
  )
  path = str(tmp_path / "saved_model")
  export.export_saved_model(model, path, spec=spec, stateful=task.stateful_model(model))
  assert export.state_size(path) == 32
  teacher = teacher_lib.Teacher.load(path, expected_classes=len(vocab), stateful=True)
  assert teacher.state_size == 32
  ids = np.random.RandomState(3).randint(0, len(vocab), (2, 11)).astype(np.int32)
  s = tf.zeros([2, 32])
  parts = []
  for a in range(0, 11, 4):
    out = teacher(tf.constant(ids[:, a : a + 4]), s)
    s = out.state
    parts.append(out.logits.numpy())
  np.testing.assert_allclose(np.concatenate(parts, 1), model(ids).numpy(), atol=1e-5)
  # ban_tf.evaluate's stateful scoring of consecutive windows: NumPy CE of one call.
  loaded = evaluate.load(path)
  windows = tf.data.Dataset.from_tensor_slices(
    (
      ids[:, :-1].reshape(2, 2, 5).transpose(1, 0, 2),
      ids[:, 1:].reshape(2, 2, 5).transpose(1, 0, 2),
    )
  )
  got = evaluate.score(loaded, windows, stateful=True)
  logp = _log_softmax(model(ids[:, :-1]).numpy().astype(np.float64))
  np.testing.assert_allclose(
    got["loss"], -np.take_along_axis(logp, ids[:, 1:, None], -1).mean(), rtol=1e-5
  )
  old = str(tmp_path / "stateless")
  export.export_saved_model(model, old, spec=spec)
  with pytest.raises(Exception, match="serve_stateful"):
    teacher_lib.Teacher.load(old, stateful=True)


@pytest.mark.slow
def test_resume_from_an_epoch_checkpoint_is_exact(tmp_path):
  _corpus(tmp_path)
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=5, state="carry")
  steps = ds.steps_per_epoch(4)

  def build():
    keras.utils.set_random_seed(7)
    student = lm_models.build_model("lstm-1-8", ds.info.num_classes, dropout=0.3)
    state = distiller_lib.CarriedState(lm_models.stateful(student), 16, 4, steps)
    model = distiller_lib.Distiller(student, state=state, perplexity=True)
    opt = keras.optimizers.SGD(0.5)
    model.compile(optimizer=opt)
    opt.build(model.train_variables)
    epoch = tf.Variable(0, dtype=tf.int64)
    return model, train.make_checkpoint(student, opt, epoch), epoch

  model, _, _ = build()
  model.fit(ds.train(4, seed=0, epochs=2)[0], epochs=2, steps_per_epoch=steps, verbose=0)
  want = [v.numpy() for v in model.student.variables]
  model, ckpt, epoch = build()
  model.fit(ds.train(4, seed=0, epochs=1)[0], epochs=1, steps_per_epoch=steps, verbose=0)
  epoch.assign(1)
  path = ckpt.save(str(tmp_path / "ckpt" / "ckpt"))
  model, ckpt, epoch = build()  # a fresh process's objects
  ckpt.restore(path).assert_existing_objects_matched()
  model.fit(
    ds.train(4, seed=0, first_epoch=1, epochs=2)[0],
    epochs=2,
    initial_epoch=1,
    steps_per_epoch=steps,
    verbose=0,
  )
  for a, b in zip(want, [v.numpy() for v in model.student.variables]):
    np.testing.assert_array_equal(a, b)
