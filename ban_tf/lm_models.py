"""Word-level language models: Zaremba LSTMs and Kim et al.'s character-aware CNN-LSTM.

`build_model(arch, vocab)` returns a functional `keras.Model` mapping int32 token ids
[N, T] to float32 next-token logits [N, T, V]; every call starts from a zero LSTM
state. `stateful(model)` is the same model (shared layers and weights) with the LSTM
state as an extra input and output: ([ids [N, T], state [N, S]]) -> [logits, state],
S = `state_size(model)` (every layer's h then c, concatenated), so a caller can carry
the state across consecutive windows (--lm_state=carry; docs/lm.md).

* ``lstm-L-H`` (Zaremba et al. 2014; the paper's Table 6 LSTM is lstm-2-1500, 51.0M): an
  H-dimensional word embedding, L LSTM layers of H units, dropout on every
  non-recurrent connection (embedding output, between layers, before the softmax),
  and the output softmax tied to the embedding (Press & Wolf; Inan et al.), so the
  output layer is ``h @ E^T + b``. Weights are uniform in [-0.05, 0.05].
* ``cnn-lstm-small`` / ``cnn-lstm-large`` (Kim et al. 2016, LSTM-CharCNN); ``cnn-lstm``
  is the large one (19M parameters on PTB, the paper's ConvLSTM): every word is
  spelled as characters (with begin/end-of-word marks, zero padded), embedded
  (15 dims), convolved with filters of widths 1..6 (small: 25w filters each) or 1..7
  (large: min(200, 50w)), tanh, max-pooled over time, passed through highway layers
  (small 1, large 2), then a 2-layer LSTM (small 300, large 650 units) with dropout
  and an untied softmax. The spelling table is a non-trainable weight of the model,
  so the SavedModel still takes word ids.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ban_tf.archs import CNN_LSTM  # pylint: disable=unused-import  # noqa: F401
from ban_tf.archs import LM_ARCH_HELP as ARCH_HELP  # pylint: disable=unused-import  # noqa: F401
from ban_tf.archs import parse_lm_arch as parse_arch

_INIT_SCALE = 0.05


def param_count(arch: str, vocab_size: int, num_chars: int = 51) -> int:
  """Trainable parameters of `build_model(arch, vocab)` in pure Python (tested equal).

  `num_chars` (cnn-lstm only): characters of the vocabulary + 3 (padding, begin, end of
  word); PTB's 10k words use about 48.
  """
  spec = parse_arch(arch)
  h = spec["units"]
  if spec["family"] == "lstm":
    return vocab_size * h + vocab_size + spec["layers"] * 4 * (2 * h * h + h)
  f = sum(spec["filters"])
  n = num_chars * spec["char_dim"]
  n += sum(w * spec["char_dim"] * k + k for w, k in zip(spec["widths"], spec["filters"]))
  n += spec["highway"] * 2 * (f * f + f)
  n += 4 * (f * h + h * h + h) + (spec["layers"] - 1) * 4 * (2 * h * h + h)
  return n + h * vocab_size + vocab_size


def _uniform():
  return keras.initializers.RandomUniform(-_INIT_SCALE, _INIT_SCALE)


@keras.saving.register_keras_serializable(package="ban_tf")
class TiedEmbedding(keras.layers.Layer):
  """A word embedding E [V, D] that also decodes: ``call(h, decode=True) = h @ E^T + b``."""

  def __init__(self, vocab_size, dim, **kwargs):
    super().__init__(**kwargs)
    self.vocab_size, self.dim = int(vocab_size), int(dim)

  def build(self, input_shape):
    self.embeddings = self.add_weight(
      shape=(self.vocab_size, self.dim), initializer=_uniform(), name="embeddings"
    )
    self.bias = self.add_weight(shape=(self.vocab_size,), initializer="zeros", name="bias")

  def call(self, inputs, decode=False):
    if decode:
      logits = ops.matmul(inputs, ops.transpose(ops.cast(self.embeddings, inputs.dtype)))
      return logits + ops.cast(self.bias, inputs.dtype)
    return ops.take(self.embeddings, ops.cast(inputs, "int32"), axis=0)

  def get_config(self):
    return dict(super().get_config(), vocab_size=self.vocab_size, dim=self.dim)


@keras.saving.register_keras_serializable(package="ban_tf")
class CharWordEncoder(keras.layers.Layer):
  """Word ids [N, T] -> character-CNN + highway word vectors [N, T, sum(filters)].

  The spelling table [V, W] (character ids, 0 = padding) is a non-trainable int32
  weight, set once with `set_spellings` and saved with the model.
  """

  def __init__(self, vocab_size, word_len, num_chars, char_dim, widths, filters, highway, **kwargs):
    super().__init__(**kwargs)
    self.vocab_size, self.word_len, self.num_chars = int(vocab_size), int(word_len), int(num_chars)
    self.char_dim, self.widths, self.filters = int(char_dim), tuple(widths), tuple(filters)
    self.num_highway = int(highway)
    self.features = sum(self.filters)
    self.char_embedding = keras.layers.Embedding(
      num_chars, char_dim, embeddings_initializer=_uniform(), name="char_embedding"
    )
    self.convs = [
      keras.layers.Conv1D(f, w, activation="tanh", kernel_initializer=_uniform(), name=f"conv_w{w}")
      for w, f in zip(self.widths, self.filters)
    ]
    # Highway: y = t * relu(W_h x) + (1 - t) * x, gate bias -2 (Kim et al.) starts near carry.
    self.highway = [
      (
        keras.layers.Dense(
          self.features, activation="relu", kernel_initializer=_uniform(), name=f"highway{i}_h"
        ),
        keras.layers.Dense(
          self.features,
          activation="sigmoid",
          kernel_initializer=_uniform(),
          bias_initializer=keras.initializers.Constant(-2.0),
          name=f"highway{i}_t",
        ),
      )
      for i in range(self.num_highway)
    ]

  def build(self, input_shape):
    self.spellings = self.add_weight(
      shape=(self.vocab_size, self.word_len),
      dtype="int32",
      initializer="zeros",
      trainable=False,
      name="spellings",
    )
    self.char_embedding.build((None, self.word_len))
    for conv in self.convs:
      conv.build((None, self.word_len, self.char_dim))
    for h, t in self.highway:
      h.build((None, self.features))
      t.build((None, self.features))

  def set_spellings(self, table):
    self.spellings.assign(np.asarray(table, np.int32))

  def call(self, ids):
    shape = ops.shape(ids)
    chars = ops.take(self.spellings, ops.reshape(ops.cast(ids, "int32"), (-1,)), axis=0)  # [NT, W]
    x = self.char_embedding(chars)
    x = ops.concatenate([ops.max(conv(x), axis=1) for conv in self.convs], axis=-1)  # max over time
    for h, t in self.highway:
      gate = t(x)
      x = gate * h(x) + (1.0 - gate) * x
    return ops.reshape(x, (shape[0], shape[1], self.features))

  def compute_output_shape(self, input_shape):
    return tuple(input_shape) + (self.features,)

  def get_config(self):
    return dict(
      super().get_config(),
      vocab_size=self.vocab_size,
      word_len=self.word_len,
      num_chars=self.num_chars,
      char_dim=self.char_dim,
      widths=list(self.widths),
      filters=list(self.filters),
      highway=self.num_highway,
    )


def spellings(vocab, min_len=1):
  """Character table for `vocab`: [V, W] ids with 1 = begin, 2 = end of word, 0 = pad.

  Returns (table, num_chars). Special tokens (<unk>, <eos>) are spelled as words.
  """
  chars = sorted({c for w in vocab for c in w})
  index = {c: i + 3 for i, c in enumerate(chars)}
  width = max(max(len(w) for w in vocab) + 2, min_len)
  table = np.zeros((len(vocab), width), np.int32)
  for i, w in enumerate(vocab):
    table[i, : len(w) + 2] = [1] + [index[c] for c in w] + [2]
  return table, len(chars) + 3


def build_model(arch: str, vocab, *, dropout: float = 0.0, name: str | None = None) -> keras.Model:
  """Builds the LM `arch` for `vocab` (a sequence of words, or a vocabulary size for lstm)."""
  spec = parse_arch(arch)
  vocab_size = vocab if isinstance(vocab, int) else len(vocab)
  ids = keras.Input(shape=(None,), dtype="int32", name="tokens")
  if spec["family"] == "lstm":
    embed = TiedEmbedding(vocab_size, spec["units"], name="embedding")
    x = embed(ids)
  else:
    if isinstance(vocab, int):
      raise ValueError("cnn-lstm needs the vocabulary words, not only its size")
    table, num_chars = spellings(vocab, min_len=max(spec["widths"]))
    encoder = CharWordEncoder(
      vocab_size,
      table.shape[1],
      num_chars,
      spec["char_dim"],
      spec["widths"],
      spec["filters"],
      spec["highway"],
      name="char_cnn",
    )
    x = encoder(ids)
    encoder.set_spellings(table)
  x = keras.layers.Dropout(dropout, name="dropout_in")(x)
  for i in range(spec["layers"]):
    # return_state: stateful() reuses these layers with an initial state; here the
    # final state is dropped (every call starts from zeros).
    x = keras.layers.LSTM(
      spec["units"],
      return_sequences=True,
      return_state=True,
      kernel_initializer=_uniform(),
      recurrent_initializer=_uniform(),
      name=f"lstm{i}",
    )(x)[0]
    x = keras.layers.Dropout(dropout, name=f"dropout{i}")(x)
  if spec["family"] == "lstm":
    logits = embed(x, decode=True)
  else:
    logits = keras.layers.Dense(vocab_size, kernel_initializer=_uniform(), name="logits")(x)
  logits = keras.layers.Activation("linear", dtype="float32", name="output")(logits)
  return keras.Model(ids, logits, name=name or spec["name"])


def _lstm_layers(model):
  layers = []
  while True:
    try:
      layers.append(model.get_layer(f"lstm{len(layers)}"))
    except ValueError:
      return layers


def state_size(model) -> int:
  """S: the width of the state `stateful(model)` carries (2 x units per LSTM layer)."""
  return sum(2 * layer.units for layer in _lstm_layers(model))


def stateful(model, name=None) -> keras.Model:
  """The LM `model` of build_model with its LSTM state as input and output.

  Returns a functional keras.Model sharing `model`'s layers (and so its weights):
  [ids int32 [N, T], state float32 [N, S]] -> [logits float32 [N, T, V], state [N, S]],
  S = state_size(model), laid out as h_0, c_0, h_1, c_1, ... (layer order). Calling
  it on consecutive windows, feeding each call's state to the next, equals calling
  `model` once on the concatenated windows (tests/lm_test.py). `model` may also be
  the stock copy `to_stock` makes (what model.keras holds). Raises ValueError for a
  model without `lstm0` (not built by build_model).
  """
  lstms = _lstm_layers(model)
  if not lstms or not isinstance(lstms[0], keras.layers.LSTM) or not lstms[0].return_state:
    raise ValueError(
      f"{model.name} is not a language model of lm_models.build_model (no stateful lstm0 layer)"
    )
  ids = keras.Input(shape=(None,), dtype="int32", name="tokens")
  state = keras.Input(shape=(state_size(model),), dtype="float32", name="state")
  first = (
    model.get_layer("embedding") if _has_layer(model, "embedding") else model.get_layer("char_cnn")
  )
  x = first(ids)
  x = model.get_layer("dropout_in")(x)
  out_states, offset = [], 0
  for i, lstm in enumerate(lstms):
    units = lstm.units
    h0 = keras.layers.Lambda(lambda s, a=offset, u=units: s[:, a : a + u], name=f"h{i}_in")(state)
    c0 = keras.layers.Lambda(lambda s, a=offset + units, u=units: s[:, a : a + u], name=f"c{i}_in")(
      state
    )
    offset += 2 * units
    x, h, c = lstm(x, initial_state=[h0, c0])
    out_states += [h, c]
    x = model.get_layer(f"dropout{i}")(x)
  if _has_layer(model, "logits"):  # cnn-lstm, or a stock copy (to_stock)
    logits = model.get_layer("logits")(x)
  else:
    logits = model.get_layer("embedding")(x, decode=True)
  logits = model.get_layer("output")(logits)
  new_state = keras.layers.Concatenate(dtype="float32", name="state_out")(
    [keras.layers.Activation("linear", dtype="float32")(t) for t in out_states]
  )
  return keras.Model([ids, state], [logits, new_state], name=name or f"{model.name}_stateful")


def _has_layer(model, name):
  return any(layer.name == name for layer in model.layers)


def _copy(layer, **overrides):
  """A fresh, unbuilt layer of `layer`'s class and configuration (weights set by the caller)."""
  return layer.__class__.from_config(dict(layer.get_config(), **overrides))


def _stock_char_encoder(encoder: CharWordEncoder) -> keras.Model:
  """CharWordEncoder as a nested functional model of stock layers, equal outputs.

  The spelling table [V, W] (fixed) and the character embedding [num_chars, C]
  (trained) are folded into one word-level Embedding [V, W * C]: row v holds the
  character vectors of word v's spelling, padding included. Each Conv1D of width w
  becomes a Conv2D with kernel (1, w) over [N, T, W, C] (the same sum per word),
  max-pooling over the W - w + 1 positions; highway layers compute
  t * h(x) + x - t * x (= t * h(x) + (1 - t) * x).
  """
  policy = encoder.dtype_policy
  width, dim = encoder.word_len, encoder.char_dim
  chars = np.asarray(encoder.spellings.numpy())
  table = np.asarray(encoder.char_embedding.get_weights()[0])[chars].reshape(
    encoder.vocab_size, width * dim
  )
  ids = keras.Input(shape=(None,), dtype="int32", name="tokens")
  lookup = keras.layers.Embedding(
    encoder.vocab_size, width * dim, dtype=policy, name="spelled_characters"
  )
  x = keras.layers.Reshape((-1, width, dim), dtype=policy, name="characters")(
    lookup(ids)
  )  # [N, T, W, C]
  lookup.set_weights([table])
  pooled = []
  for conv in encoder.convs:
    w, f = conv.kernel_size[0], conv.filters
    conv2d = keras.layers.Conv2D(
      f, (1, w), activation=conv.activation, dtype=policy, name=conv.name
    )
    y = conv2d(x)  # [N, T, W - w + 1, f]
    kernel, bias = conv.get_weights()
    conv2d.set_weights([kernel[None], bias])
    y = keras.layers.MaxPooling2D((1, width - w + 1), dtype=policy, name=f"{conv.name}_max")(y)
    pooled.append(keras.layers.Reshape((-1, f), dtype=policy, name=f"{conv.name}_words")(y))
  x = keras.layers.Concatenate(dtype=policy, name="char_features")(pooled)
  for i, (h, t) in enumerate(encoder.highway):
    h2, t2 = _copy(h), _copy(t)
    gate, carry = t2(x), h2(x)
    h2.set_weights(h.get_weights())
    t2.set_weights(t.get_weights())
    moved = keras.layers.Multiply(dtype=policy, name=f"highway{i}_moved")([gate, carry])
    kept = keras.layers.Subtract(dtype=policy, name=f"highway{i}_kept")(
      [x, keras.layers.Multiply(dtype=policy, name=f"highway{i}_gated")([gate, x])]
    )
    x = keras.layers.Add(dtype=policy, name=f"highway{i}")([moved, kept])
  return keras.Model(ids, x, name=encoder.name)


def to_stock(model: keras.Model) -> keras.Model:
  """The LM `model` with stock Keras layers only: what its `model.keras` file holds.

  Loads in plain Keras (no ban_tf import) and gives the same logits [N, T, V] for
  int32 ids [N, T] (tests/lm_test.py, to float32 rounding). For inference and as a
  teacher; ban_tf trains with the custom layers:
  * lstm: the tied TiedEmbedding becomes an Embedding "embedding" (E [V, D]) and a
    Dense "logits" with kernel E^T [D, V] and bias b (two copies of E: the file no
    longer ties them, so fine-tuning it in plain Keras unties them);
  * cnn-lstm: the CharWordEncoder becomes a nested functional model "char_cnn"
    (_stock_char_encoder).
  Names of the other layers are kept, so `stateful` works on the copy too. A model
  without those custom layers is returned as is.

  Args:
    model: a built language model of `build_model`.

  Returns:
    A new functional keras.Model (new weights, equal values), or `model`.
  """
  custom = (TiedEmbedding, CharWordEncoder)
  if not any(isinstance(layer, custom) for layer in model.layers):
    return model
  ids = keras.Input(shape=(None,), dtype="int32", name="tokens")
  tied = model.get_layer("embedding") if _has_layer(model, "embedding") else None
  if tied is not None:
    embedding = keras.layers.Embedding(
      tied.vocab_size, tied.dim, dtype=tied.dtype_policy, name="embedding"
    )
    x = embedding(ids)
    embedding.set_weights([tied.get_weights()[0]])
  else:
    x = _stock_char_encoder(model.get_layer("char_cnn"))(ids)
  x = _copy(model.get_layer("dropout_in"))(x)
  for i, lstm in enumerate(_lstm_layers(model)):
    copy = _copy(lstm)
    x = copy(x)[0]
    copy.set_weights(lstm.get_weights())
    x = _copy(model.get_layer(f"dropout{i}"))(x)
  if tied is not None:
    decode = keras.layers.Dense(tied.vocab_size, dtype=tied.dtype_policy, name="logits")
    x = decode(x)
    table, bias = tied.get_weights()
    decode.set_weights([table.T, bias])
  else:
    dense = model.get_layer("logits")
    decode = _copy(dense)
    x = decode(x)
    decode.set_weights(dense.get_weights())
  x = _copy(model.get_layer("output"))(x)
  return keras.Model(ids, x, name=model.name)
