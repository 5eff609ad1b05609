"""Tests for the language-modelling task: reader, batching, models, per-token loss, export.

Golden values come from NumPy re-computations, never from stored numbers.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from ban_tf import config
from ban_tf import distiller as distiller_lib
from ban_tf import errors
from ban_tf import export
from ban_tf import schedules
from ban_tf import tasks
from ban_tf import lm_models
from ban_tf import main
from ban_tf import text_data
from ban_tf import teacher as teacher_lib
from tests.conftest import REPO
from tests.conftest import SHARED_TFDS
from tests.conftest import strategy_for


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _strategy(replicas):
  return strategy_for(replicas)


# ---- reader and vocabulary ----------------------------------------------------------------
def test_ptb_reader_vocab_unk_eos(tmp_path):
  _write(tmp_path / "ptb.train.txt", " b a <unk> b \n c b a\n\n")
  _write(tmp_path / "ptb.valid.txt", " a d \n")
  _write(tmp_path / "ptb.test.txt", " c \n")
  assert text_data.read_lines_ptb(tmp_path / "ptb.train.txt") == [
    ["b", "a", "<unk>", "b", "<eos>"],
    ["c", "b", "a", "<eos>"],
  ]
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=2)
  # <unk>, <eos>, then by count (b 3, a 2, c 1).
  assert ds.info.vocab == ("<unk>", "<eos>", "b", "a", "c")
  assert ds.info.num_classes == 5 and ds.info.image_shape == (2,)
  np.testing.assert_array_equal(ds.ids["train"], [2, 3, 0, 2, 1, 4, 2, 3, 1])
  np.testing.assert_array_equal(ds.ids["val"], [3, 0, 1])  # d is not a training word
  capped = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), vocab_size=4)
  assert capped.info.vocab == ("<unk>", "<eos>", "b", "a")
  np.testing.assert_array_equal(capped.ids["train"], [2, 3, 0, 2, 1, 0, 2, 3, 1])
  with pytest.raises(errors.DataError, match="ptb.valid.txt"):
    os.remove(tmp_path / "ptb.valid.txt")
    text_data.TextDataset("ptb", ptb_dir=str(tmp_path))


def test_tokenize_text_words_punctuation_eos():
  text = "First Citizen:\nBefore we proceed, hear me speak!\n\nCall'd it."
  assert text_data.tokenize_text(text) == [
    ["first", "citizen", ":", "<eos>"],
    ["before", "we", "proceed", ",", "hear", "me", "speak", "!", "<eos>"],
    ["call'd", "it", ".", "<eos>"],
  ]


def test_tiny_shakespeare_word_level():
  ds = text_data.TextDataset("tiny_shakespeare", data_dir=SHARED_TFDS, vocab_size=5000, bptt=35)
  vocab = ds.info.vocab
  assert len(vocab) == 5000 and vocab[:2] == ("<unk>", "<eos>")
  assert [vocab[i] for i in ds.ids["train"][:4]] == ["first", "citizen", ":", "<eos>"]
  unk_rate = float(np.mean(ds.ids["train"] == 0))
  assert 0.0 < unk_rate < 0.1
  assert ds.info.num_train > 200000 and ds.info.num_val > 10000 and ds.info.num_test > 10000


# ---- Zaremba batching ------------------------------------------------------------------------
def test_batchify_and_windows_layout():
  ids = np.arange(23, dtype=np.int32)
  rows = text_data.batchify(ids, 2)
  np.testing.assert_array_equal(
    rows, [np.arange(11), np.arange(11, 22)]
  )  # contiguous rows, tail dropped
  full = text_data.windows(rows, 4)
  assert len(full) == 2  # starts 0, 4; the short last window (2 steps) is dropped
  for k, (x, y) in enumerate(full):
    np.testing.assert_array_equal(x, rows[:, 4 * k : 4 * k + 4])
    np.testing.assert_array_equal(y, rows[:, 4 * k + 1 : 4 * k + 5])  # targets shifted by one
  every = text_data.windows(rows, 4, full_only=False)
  assert [x.shape[1] for x, _ in every] == [4, 4, 2]
  targets = np.concatenate([y for _, y in every], axis=1)
  np.testing.assert_array_equal(targets, rows[:, 1:])  # evaluation scores every token once


def test_train_pipeline_epochs_are_shuffled_permutations(tmp_path):
  words = " ".join(f"w{i % 7}" for i in range(200))
  for name in ("train", "valid", "test"):
    _write(tmp_path / f"ptb.{name}.txt", words + "\n")
  ds = text_data.TextDataset("ptb", ptb_dir=str(tmp_path), bptt=5)
  pipe, steps = ds.train(4, seed=3, epochs=2)
  got = [(x.numpy(), y.numpy()) for x, y in pipe]
  want = text_data.windows(text_data.batchify(ds.ids["train"], 4), 5)
  assert steps == len(want) == 9 and len(got) == 2 * steps
  key = lambda w: w[0].tobytes()
  for epoch in (got[:steps], got[steps:]):
    assert sorted(map(key, epoch)) == sorted(map(key, want))
  assert list(map(key, got[:steps])) != list(map(key, got[steps:]))
  resumed, _ = ds.train(4, seed=3, first_epoch=1, epochs=2)  # a function of (seed, epoch)
  assert [key((x.numpy(),)) for x, _ in resumed] == list(map(key, got[steps:]))
  assert sum(int(np.size(y)) for _, y in ds.test(4)) == ds.eval_tokens("test", 4)


# ---- models ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,units,vocab", [(1, 16, 50), (2, 8, 30)])
def test_lstm_params_tied(layers, units, vocab):
  model = lm_models.build_model(f"lstm-{layers}-{units}", vocab)
  lstm = 4 * (units * units + units * units + units)
  assert model.count_params() == vocab * units + vocab + layers * lstm  # one shared V x H matrix
  out = model(np.random.randint(0, vocab, (3, 7)).astype(np.int32))
  assert tuple(out.shape) == (3, 7, vocab) and out.dtype == "float32"


@pytest.mark.parametrize("arch", ["lstm-1-16", "lstm-2-8", "cnn-lstm-small"])
def test_param_count_formula_equals_the_keras_build(arch):
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}{'x' * (i % 5)}" for i in range(40))
  model = lm_models.build_model(arch, vocab)
  _, num_chars = lm_models.spellings(vocab)
  trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
  assert lm_models.param_count(arch, len(vocab), num_chars) == trainable
  assert lm_models.param_count("lstm-2-1500", 10000) == 51_022_000  # Table 6's LSTM (paper: 52M)


def test_cnn_lstm_small_matches_kim():
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}" for i in range(40))
  model = lm_models.build_model("cnn-lstm-small", vocab)
  table, num_chars = lm_models.spellings(vocab, min_len=6)
  widths, filters = range(1, 7), [25 * w for w in range(1, 7)]
  feats = sum(filters)
  want = (
    num_chars * 15
    + sum(w * 15 * f + f for w, f in zip(widths, filters))
    + 2 * (feats * feats + feats)
    + 4 * (feats * 300 + 300 * 300 + 300)
    + 4 * (2 * 300 * 300 + 300)
    + 300 * len(vocab)
    + len(vocab)
  )
  assert model.count_params() == want + table.size  # + the non-trainable spelling table
  np.testing.assert_array_equal(model.get_layer("char_cnn").spellings.numpy(), table)
  assert table[2, 0] == 1 and table[2, 3] == 2 and not table[2, 4:].any()  # <bow> w 0 <eow> pad
  with pytest.raises(ValueError, match="Accepted forms"):
    lm_models.parse_arch("lstm-2")


@pytest.mark.parametrize("arch", ["lstm-2-8", "cnn-lstm-small"])
def test_stock_copy_equals_the_model_and_carries_state(arch):
  """lm_models.to_stock (what model.keras holds): stock Keras layers only, the same
  logits [N, T, V], and `stateful` on the copy carries the state as on the model."""
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}{'x' * (i % 5)}" for i in range(20))
  keras.utils.set_random_seed(4)
  model = lm_models.build_model(arch, vocab)
  rng = np.random.RandomState(5)  # +-0.5 weights: the stock +-0.05 init makes every logit ~0
  model.set_weights(
    [
      w + rng.uniform(-0.5, 0.5, w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
      for w in model.get_weights()
    ]
  )
  stock = lm_models.to_stock(model)
  kinds = {type(layer) for layer in stock.layers}
  kinds |= (
    {type(layer) for layer in stock.get_layer(stock.layers[1].name).layers}
    if arch.startswith("cnn")
    else set()
  )
  assert all(k.__module__.startswith("keras.") for k in kinds), kinds
  x = keras.ops.convert_to_tensor(rng.randint(0, len(vocab), (3, 9)).astype(np.int32))
  want = model(x).numpy()
  assert want.std() > 0.1  # not a trivially flat model
  np.testing.assert_allclose(stock(x).numpy(), want, rtol=1e-5, atol=1e-5)
  s_model, s_stock = lm_models.stateful(model), lm_models.stateful(stock)
  state = keras.ops.zeros((3, lm_models.state_size(model)))
  a_logits, a_state = s_model([x[:, :4], state])
  b_logits, b_state = s_stock([x[:, :4], state])
  a2, _ = s_model([x[:, 4:], a_state])
  b2, _ = s_stock([x[:, 4:], b_state])
  np.testing.assert_allclose(b_logits.numpy(), a_logits.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b2.numpy(), a2.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b2.numpy(), want[:, 4:], rtol=1e-4, atol=1e-4)  # carried == one call
  assert lm_models.to_stock(stock) is stock  # already stock


# ---- per-token BAN+L loss ------------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [1, 2])
def test_ban_l_loss_is_per_token_golden(replicas):
  vocab, batch, steps, temperature = 11, 4, 6, 2.0
  strategy = _strategy(replicas)
  rng = np.random.RandomState(0)
  x = rng.randint(0, vocab, (batch, steps)).astype(np.int32)
  y = rng.randint(0, vocab, (batch, steps)).astype(np.int32)
  keras.utils.set_random_seed(1)
  with strategy.scope():
    student = lm_models.build_model("lstm-1-8", vocab)
    teacher = lm_models.build_model("lstm-1-8", vocab)
    model = distiller_lib.Distiller(
      student, teacher, loss="ban_l", temperature=temperature, kd_weight=1.0, label_weight=1.0
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0))
  s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
  p = np.exp(_log_softmax(t / temperature))
  kd_tokens = -(temperature**2) * (p * _log_softmax(s / temperature)).sum(-1)  # [B, T]
  ce_tokens = -np.take_along_axis(_log_softmax(s), y[..., None], -1)[..., 0]
  got = model.train_on_batch(x, y, return_dict=True)
  np.testing.assert_allclose(got["kd_loss"], kd_tokens.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["label_loss"], ce_tokens.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["loss"], kd_tokens.mean() + ce_tokens.mean(), rtol=1e-5)
  # Per token, not per sequence (summed over T) nor per batch row.
  assert abs(got["kd_loss"] - kd_tokens.sum(1).mean()) > 1.0
  agree = (s.argmax(-1) == t.argmax(-1)).mean()
  np.testing.assert_allclose(got["teacher_agreement"], agree, rtol=1e-6)


def _one_clipped_step(replicas, x, y, clip_norm):
  strategy = _strategy(replicas)
  keras.utils.set_random_seed(5)
  with strategy.scope():
    student = lm_models.build_model("lstm-1-8", 13)
    model = distiller_lib.Distiller(student, clip_norm=clip_norm)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
  before = [v.numpy() for v in student.trainable_variables]
  model.train_on_batch(x, y)
  return before, [v.numpy() for v in student.trainable_variables]


@pytest.mark.slow
def test_clip_norm_clips_the_global_gradient():
  rng = np.random.RandomState(2)
  x = rng.randint(0, 13, (4, 5)).astype(np.int32)
  y = rng.randint(0, 13, (4, 5)).astype(np.int32)
  clip = 0.05
  before, one = _one_clipped_step(1, x, y, clip)
  _, two = _one_clipped_step(2, x, y, clip)
  # Reference: the full-batch per-token mean CE gradient, clipped by its global norm.
  keras.utils.set_random_seed(5)
  ref = lm_models.build_model("lstm-1-8", 13)
  for v, b in zip(ref.trainable_variables, before):
    v.assign(b)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, ref(x)))
  grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, ref.trainable_variables)]
  assert float(tf.linalg.global_norm(grads)) > 2 * clip  # the clip is active
  grads, _ = tf.clip_by_global_norm(grads, clip)
  for b, g, w1, w2 in zip(before, grads, one, two):
    np.testing.assert_allclose(w1, b - 0.5 * g.numpy(), atol=1e-6)
    np.testing.assert_allclose(w2, w1, atol=1e-6)


# ---- plateau schedule ---------------------------------------------------------------------------
def test_plateau_lr():
  assert schedules.plateau_lr(1.0, [], 0.25) == 1.0
  # 95 does not improve on 90; 89 does; the second 89 does not.
  assert schedules.plateau_lr(1.0, [100, 90, 95, 89, 89], 0.25) == 0.25**2
  # CNN-LSTM: must improve by more than 0.5 (99.6 and 98.6 do not).
  assert schedules.plateau_lr(2.0, [100, 99.6, 99.0, 98.6], 0.5, 0.5) == 0.5


def test_plateau_lr_previous_epoch_reference():
  ppls = [100, 101, 100.4, 99.8]
  # Against the best (100): 101, 100.4 and 99.8 all fail to beat 99.5.
  assert schedules.plateau_lr(2.0, ppls, 0.5, 0.5, "best") == 2.0 * 0.5**3
  # Against the previous epoch: only 101 (a rise) falls by less than 0.5; 100.4 and 99.8 fall 0.6.
  assert schedules.plateau_lr(2.0, ppls, 0.5, 0.5, "previous") == 1.0
  # "Decrease by at least 0.5": exactly 0.5 keeps the rate; "improve by more than": it does not.
  assert schedules.plateau_lr(2.0, [100, 99.5], 0.5, 0.5, "previous") == 2.0
  assert schedules.plateau_lr(2.0, [100, 99.5], 0.5, 0.5, "best") == 1.0
  assert schedules.plateau_lr(1.0, [100, 100], 0.25, 0.0, "previous") == 1.0  # no rise, delta 0
  with pytest.raises(ValueError, match="best or previous"):
    schedules.plateau_lr(1.0, [100], 0.5, 0.0, "last")


# ---- export round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["lstm-1-16", "cnn-lstm-small"])
@pytest.mark.slow
def test_export_round_trip_ids_to_logits(tmp_path, arch):
  vocab = ("<unk>", "<eos>") + tuple(f"w{i}" for i in range(30))
  model = lm_models.build_model(arch, vocab)
  path = str(tmp_path / "saved_model")
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
  fingerprint = export.export_saved_model(model, path, (5,), spec=spec)
  data = np.load(os.path.join(path, export.FINGERPRINT_FILE))
  assert data["inputs"].dtype == np.int32 and fingerprint.shape == (4, 5, len(vocab))
  teacher = teacher_lib.Teacher.load(path, expected_classes=len(vocab))
  x = np.random.RandomState(0).randint(0, len(vocab), (3, 9)).astype(np.int32)  # another T
  np.testing.assert_allclose(teacher(x).logits.numpy(), model(x).numpy(), atol=1e-5)
  with pytest.raises(errors.TeacherError, match="outputs 32 classes"):
    teacher_lib.Teacher.load(path, expected_classes=7)


# ---- flags and the Table 6 presets ---------------------------------------------------------------
# (preset, arch, batch, the quoted recipe's lr and clip on the loss summed over the unrolled steps)
_TABLE6 = [
  ("table6_lstm", "lstm-2-1500", 32, 1.0, 10.0),
  ("table6_cnn-lstm", "cnn-lstm", 20, 2.0, 5.0),
]
_PTB_WORDS = "the a of to in and n't 's is was stock market share year company said".split()


def _ptb_corpus(directory):
  """A small corpus in PTB format: one sentence per line, space separated, leading space, <unk>."""
  rng = np.random.RandomState(7)
  for name, lines in (("train", 420), ("valid", 60), ("test", 60)):
    with open(os.path.join(directory, f"ptb.{name}.txt"), "w") as f:
      for _ in range(lines):
        words = [str(w) for w in rng.choice(_PTB_WORDS + ["<unk>", "N"], rng.randint(4, 12))]
        f.write(" " + " ".join(words) + " \n")


def _preset_config(name, *extra):
  fv = flags.FlagValues()
  main.define_flags(fv)
  fv(["prog", f"--flagfile={os.path.join(REPO, 'flags', 'paper', name + '.flags')}", *extra])
  cfg = main.config_from_flags(fv)
  cfg.validate()
  return cfg


@pytest.mark.parametrize("name,arch,batch,recipe_lr,recipe_clip", _TABLE6)
def test_paper_flagfiles(name, arch, batch, recipe_lr, recipe_clip):
  path = os.path.join(REPO, "flags", "paper", f"{name}.flags")
  assert open(path).readline().startswith("# Paper Table 6")
  cfg = _preset_config(name, "--ptb_dir=/data/ptb")
  assert (cfg.task, cfg.arch, cfg.batch_size, cfg.epochs, cfg.bptt) == ("lm", arch, batch, 40, 35)
  assert cfg.resolved_loss == "ban_l" and cfg.resolved_label_weight == 1.0
  assert (
    cfg.momentum == 0 and cfg.weight_decay == 0
  )  # plain SGD: lr and loss scale are interchangeable
  # LSTM: the PyTorch example's rule (beat the best); CNN-LSTM: the paper's "decrease by 0.5 after an epoch".
  assert (cfg.lr_plateau_reference, cfg.lr_plateau_min_delta) == (
    ("best", 0.0) if name == "table6_lstm" else ("previous", 0.5)
  )
  # Per-token mean = (per-sequence sum) / bptt: the recipe's rate x bptt, its clip / bptt.
  assert cfg.lr == recipe_lr * cfg.bptt
  np.testing.assert_allclose(cfg.clip_norm * cfg.bptt, recipe_clip, rtol=1e-15)


def _recipe_loss(model, x, y):
  """Zaremba et al.'s LM loss: cross-entropy summed over the unrolled steps, averaged over the batch."""
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x, training=False))  # [B, T]
  return tf.reduce_mean(tf.reduce_sum(ce, axis=1))


@pytest.mark.parametrize("name,arch,batch,recipe_lr,recipe_clip", _TABLE6)
@pytest.mark.parametrize(
  "clip_scale", [1.0, 1e-3]
)  # the preset's own clip; one small enough to fire
def test_preset_step_is_the_quoted_recipe_step(
  tmp_path, name, arch, batch, recipe_lr, recipe_clip, clip_scale
):
  """One SGD step under the preset (per-token mean) equals one step of the quoted recipe (sum over steps).

  The data are the preset's own windows of a small PTB-format corpus read by the PTB reader; the model
  is a small stand-in for the preset's (the equivalence is about the loss reduction, not the model).
  """
  _ptb_corpus(str(tmp_path))
  cfg = _preset_config(name, f"--ptb_dir={tmp_path}")
  data = text_data.TextDataset(
    cfg.dataset, ptb_dir=cfg.ptb_dir, vocab_size=cfg.vocab_size, bptt=cfg.bptt
  )
  assert (
    data.info.vocab[:2] == ("<unk>", "<eos>") and len(data.info.vocab) == len(_PTB_WORDS) + 3
  )  # + N
  pipe, steps = data.train(cfg.batch_size, seed=0)
  assert steps == (data.info.num_train // cfg.batch_size - 1) // cfg.bptt
  x, y = next(iter(pipe))
  assert x.shape == y.shape == (cfg.batch_size, cfg.bptt) and x.dtype == tf.int32
  vocab = data.info.num_classes
  keras.utils.set_random_seed(3)
  student = lm_models.build_model("lstm-2-8", vocab)
  before = [v.numpy() for v in student.trainable_variables]
  # The recipe's gradient is exactly bptt x ours.
  with tf.GradientTape(persistent=True) as tape:
    ours = tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(y, student(x, training=False))
    )
    theirs = _recipe_loss(student, x, y)
  g_ours = [
    tf.convert_to_tensor(g).numpy() for g in tape.gradient(ours, student.trainable_variables)
  ]
  g_theirs = [
    tf.convert_to_tensor(g).numpy() for g in tape.gradient(theirs, student.trainable_variables)
  ]
  for a, b in zip(g_ours, g_theirs):
    np.testing.assert_allclose(cfg.bptt * a, b, rtol=2e-5, atol=1e-7)
  # The quoted recipe's step, in NumPy: w - lr * clip(g_sum, clip_norm).
  clip = recipe_clip * clip_scale
  norm = np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in g_theirs))
  assert (norm > clip) == (
    clip_scale < 1
  )  # the preset's clip does not fire here; the small one does
  factor = min(1.0, clip / norm)
  want = [w - recipe_lr * factor * g for w, g in zip(before, g_theirs)]
  # ban_tf's step under the preset: the Distiller (per-token mean, global clip) and the LM task's optimizer.
  model = distiller_lib.Distiller(
    student, clip_norm=cfg.clip_norm * clip_scale, weight_decay=cfg.weight_decay
  )
  model.compile(optimizer=tasks.get("lm").make_optimizer(cfg, steps_per_epoch=1))
  model.train_on_batch(x, y)
  for w, v in zip(want, student.trainable_variables):
    np.testing.assert_allclose(v.numpy(), w, rtol=1e-4, atol=1e-6)
  moved = max(
    float(np.abs(v.numpy() - b).max()) for v, b in zip(student.trainable_variables, before)
  )
  assert moved > 1e-3  # a real step, not a no-op


@pytest.mark.parametrize(
  "kwargs,fragment",
  [
    (dict(dataset="ptb"), "--ptb_dir"),
    (dict(arch="wrn-28-1"), "--arch='wrn-28-1'"),
    (dict(bptt=0), "--bptt=0"),
    (dict(clip_norm=-1.0), "--clip_norm=-1.0"),
    (dict(lr_plateau_reference="last"), "--lr_plateau_reference='last'"),
  ],
)
def test_lm_usage_errors(kwargs, fragment):
  cfg = config.Config(
    **dict(dict(task="lm", dataset="tiny_shakespeare", arch="lstm-1-8"), **kwargs)
  )
  with pytest.raises(errors.UsageError) as err:
    cfg.validate()
  assert fragment in str(err.value) and "\n" not in str(err.value)
